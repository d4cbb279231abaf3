#!/usr/bin/env bash
# make demo: make sure the real Fashion-MNIST is on this machine (the default config's data).
# Silent when the data is there (Debian package or $XKD_FASHION_MNIST); otherwise installs the Debian
# package dataset-fashion-mnist, or says how to get the files and exits 1.
set -uo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -n "${XKD_FASHION_MNIST:-}" ] || [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
echo "xkd demo: installing the Debian package dataset-fashion-mnist (31 MB, Fashion-MNIST, MIT licence) with apt-get"
sudo=""
can_install=no
if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    can_install=yes
  elif command -v sudo >/dev/null 2>&1; then
    sudo="sudo"
    can_install=yes
  fi
fi
if [ "$can_install" = yes ] && $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist \
  && [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
cat >&2 <<MSG
xkd demo: could not install dataset-fashion-mnist (needs apt-get and root or sudo). Get the four
Fashion-MNIST idx files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz; github.com/zalandoresearch/fashion-mnist)
into a folder and run:  XKD_FASHION_MNIST=/that/folder make demo
MSG
exit 1
