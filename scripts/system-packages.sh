#!/usr/bin/env bash
# Debian packages the tests use: real data (emoji font and names, Fashion-MNIST)
# and the headless browser that drives `dalle serve`'s page (chromium + its driver).
# Installs the missing ones when this machine lets us (root or sudo, apt-get);
# otherwise says so, and the tests that need them skip with the same command.
# Sourced by scripts/test.sh and .ci/run.
DALLE_SYSTEM_PACKAGES="fonts-noto-color-emoji unicode-data dataset-fashion-mnist chromium chromium-driver"
dalle_system_packages() {
  local missing=()
  for pkg in $DALLE_SYSTEM_PACKAGES; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo"; else
      echo "note: tests that need ${missing[*]} will skip (install: apt-get install ${missing[*]})" >&2
      return 0
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "note: no apt-get here; tests that need ${missing[*]} will skip" >&2
    return 0
  fi
  echo "installing ${missing[*]} (Debian packages the data tests read)" >&2
  $sudo apt-get update -qq >/dev/null 2>&1 || true
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
    || echo "note: could not install ${missing[*]}; the tests that need them will skip" >&2
}
