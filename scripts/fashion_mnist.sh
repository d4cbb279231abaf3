#!/usr/bin/env bash
# make demo: make sure the real Fashion-MNIST is on this machine (the default config's data).
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -n "${XKD_FASHION_MNIST:-}" ] || [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
echo "xkd demo: installing the Debian package dataset-fashion-mnist (31 MB; Fashion-MNIST, MIT licence) with apt-get"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
fi
if command -v apt-get >/dev/null 2>&1 && { [ -z "$sudo" ] && [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; }; then
  $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist && exit 0
fi
cat >&2 <<MSG
xkd demo: could not install dataset-fashion-mnist. Get the four Fashion-MNIST idx files
(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz,
t10k-labels-idx1-ubyte.gz) into a folder and run: XKD_FASHION_MNIST=/that/folder make demo
MSG
exit 1
