#!/usr/bin/env bash
# Debian packages the test suite needs: OpenSSH (a real sshd on loopback for remote benchmarks),
# Chromium (renders the HTML report), qemu-user-static (runs the aarch64 runtime for --verify-arm),
# dataset-fashion-mnist (the Fashion-MNIST IDX files in /usr/share/datasets/fashion-mnist).
set -euo pipefail
need=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need+=(openssh-server openssh-client)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
[ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || need+=(dataset-fashion-mnist)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "system_deps: missing ${need[*]}; install them as root (apt-get install -y ${need[*]})" >&2
    exit 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
