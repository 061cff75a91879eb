#!/bin/sh
# Debian packages the tests need. Installed once per .venv (make keeps a stamp); needs root or sudo.
set -eu
# default-jdk, kotlin, libandroid-json-java: build and test the bridge's Java/Kotlin clients.
# dcmtk: real DICOM peers (echoscu, storescu, storescp) in the DICOM tests and benchmark.
# dicom3tools: dciodvfy, which validates the DICOM SR the reports export.
# poppler-utils: pdftoppm/pdftotext, which render and read the PDF reports in the tests.
# chromium: the web page's end-to-end tests (driven by Playwright, tests/test_web_page.py).
PKGS="default-jdk kotlin libandroid-json-java chromium dcmtk dicom3tools poppler-utils"
missing=""
for p in $PKGS; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
