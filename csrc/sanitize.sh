#!/usr/bin/env bash
# sanitize.sh - build csrc/test_native.c against csrc/vhdx_native.c with
# AddressSanitizer + UndefinedBehaviorSanitizer and run it.
#
# SPDX-License-Identifier: Apache-2.0
#
#   bash csrc/sanitize.sh            # from anywhere; CC=clang also works
#
# Exits non-zero on a failed check, a compiler warning (-Werror), any ASan
# report (including leaks) or any UBSan report.
#
# The driver links with ld --wrap for pread64/pwrite64/copy_file_range/
# fallocate64/ioctl/posix_memalign so it can inject short transfers, EINTR
# and errnos (glibc with 64-bit off_t; these are the symbols the library
# references there).
#
# If run as root with mkfs.xfs available, a 1 GiB sparse XFS image with
# reflink=1 is loop-mounted in a temporary directory so the FICLONERANGE
# success paths run too; set VHDX_SANITIZE_REFLINK=0 to skip that. The
# mount and image are always removed on exit.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
CC=${CC:-gcc}
work=$(mktemp -d "${TMPDIR:-/tmp}/vhdx-sanitize.XXXXXX")
mnt=""

cleanup() {
    if [[ -n "$mnt" ]] && mountpoint -q "$mnt" 2>/dev/null; then
        umount "$mnt" || umount -l "$mnt" || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

wrap="-Wl,--wrap=pread64,--wrap=pwrite64,--wrap=copy_file_range,--wrap=fallocate64,--wrap=ioctl,--wrap=posix_memalign"

"$CC" -std=c99 -g -O1 -Wall -Wextra -Werror \
    -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
    -I"$here" "$here/vhdx_native.c" "$here/test_native.c" $wrap -pthread \
    -o "$work/test_native"

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1

args=()
if [[ "${VHDX_SANITIZE_REFLINK:-1}" != 0 && $(id -u) == 0 ]] && command -v mkfs.xfs >/dev/null; then
    truncate -s 1G "$work/xfs.img"
    if mkfs.xfs -q -m reflink=1 "$work/xfs.img" && mkdir "$work/mnt" &&
        mount -o loop "$work/xfs.img" "$work/mnt"; then
        mnt="$work/mnt"
        args=("$mnt")
    else
        echo "note: could not create/mount a reflink XFS; clone tests skipped" >&2
    fi
fi

"$work/test_native" "${args[@]}"
