#!/usr/bin/env sh
# Fashion-MNIST for the demo and the tests (Debian's dataset-fashion-mnist), installed by `make data`.
#   as root with apt:  the Debian package, system-wide (/usr/share/datasets/fashion-mnist);
#   apt without root:  the same package, downloaded and unpacked into VENV/share/datasets/fashion-mnist,
#                      where compress also looks;
#   neither:           nothing (exit 0); compress then says in one line what to install and how.
# A root install that fails (no network, a broken apt) is an error: CI must not skip the data's tests quietly.
set -u
venv=${1:-.venv}
dest="$venv/share/datasets/fashion-mnist"
have() {
  for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
    [ -s "$1/$f" ] || return 1
  done
}
for d in "${COMPRESS_FASHION_MNIST:-}" /usr/share/datasets/fashion-mnist "$dest"; do
  [ -n "$d" ] && have "$d" && exit 0
done
command -v apt-get >/dev/null 2>&1 || exit 0
if [ "$(id -u)" = 0 ]; then
  echo "installing Debian's dataset-fashion-mnist (31 MB) ..."
  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }
  have /usr/share/datasets/fashion-mnist && exit 0
  echo "error: apt-get could not install dataset-fashion-mnist; run 'apt-get install dataset-fashion-mnist' to see why" >&2
  exit 1
fi
command -v dpkg-deb >/dev/null 2>&1 || exit 0
tmp=$(mktemp -d) || exit 0
trap 'rm -rf "$tmp"' EXIT
echo "downloading Debian's dataset-fashion-mnist (31 MB) into $dest ..."
if (cd "$tmp" && apt-get download -qq dataset-fashion-mnist >/dev/null 2>&1) && dpkg-deb -x "$tmp"/dataset-fashion-mnist_*.deb "$tmp/root"; then
  mkdir -p "$dest" && cp "$tmp"/root/usr/share/datasets/fashion-mnist/*.gz "$dest"/
fi
have "$dest" || rm -rf "$dest"
exit 0
