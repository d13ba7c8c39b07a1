#!/usr/bin/env bash
# A real headless browser for the dashboard's test: Debian's chromium and
# chromium-driver (installed with apt-get when missing and this runs as
# root). Prints chromedriver's path, or nothing when none can be had.
set -euo pipefail
if ! command -v chromedriver > /dev/null || ! { command -v chromium > /dev/null || command -v chromium-browser > /dev/null; }; then
    if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
        echo "browser: installing chromium and chromium-driver with apt-get" >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >&2
    else
        echo "browser: no chromium/chromedriver and no root to install them (apt-get install chromium chromium-driver)" >&2
        exit 0
    fi
fi
command -v chromedriver
