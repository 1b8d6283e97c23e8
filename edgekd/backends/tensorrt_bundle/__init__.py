"""Files copied into a Jetson bundle: build_engine.sh (trtexec), trt_runner.py and trt_device.py (tensorrt
Python API), README.md."""
