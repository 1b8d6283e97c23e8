"""Causal language models (task causal-lm): loading the teacher and sizing the student (models), the
KV-cache ONNX decoder (export) and its runtime loop (decode), speculative decoding (speculative), the
pipeline's entry for the task (entry) and `edgekd generate` (generate). The LM parts of the stages live
beside their image counterparts: data/text.py, distill/lm_*.py, quantize/lm_weights.py, bench/lm_bench.py,
report/assemble_lm.py and report/tables_lm.py."""
