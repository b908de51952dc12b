#!/usr/bin/env bash
# Installs the Debian tools the report tests use, when missing: pdftoppm and pdftotext
# (poppler-utils) turn the PDF report into PNG pages and text, and headless Chromium renders
# the HTML report. Needs root (as on the project's machines); the tests fail, never skip,
# without them.
set -u
missing=()
command -v pdftoppm >/dev/null 2>&1 || missing+=(poppler-utils)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null 2>&1 || true
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || echo "could not install ${missing[*]}: the report tests will fail"
fi
exit 0
