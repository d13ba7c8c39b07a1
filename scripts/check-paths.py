#!/usr/bin/env python3
"""Fails if the test run read a path outside the repository that a fresh
clone would not have.

Reads an strace log of the test run (`strace -f -y -e trace=%file ...`, as
scripts/test.sh writes it when FLAME_TRACE_PATHS is set) and lists every path
a test process opened, looked at or ran, successfully, that lies outside

  - the repository itself,
  - what every machine has: the system folders, temporary folders, the
    folders on PATH, the Rust toolchain (CARGO_HOME, RUSTUP_HOME), the Python
    installation, and programs' own settings (dot-files in the home folder,
    `.cargo` and `rust-toolchain` looked up in the folders above the
    repository).

Not even ../shared/flame-examples (Flame's fixtures, beside the repository in
CI only) is allowed: test.sh runs this check with FLAME_EXAMPLES empty, as a
fresh clone runs, and .ci/run compares with Flame's fixtures in a separate
step. Lookups that found nothing are not reads and are left out: in CI the
sibling folders exist, so a test that reads one, or looks for one and skips
quietly without it, is named here.

usage: check-paths.py TRACE REPOSITORY
"""

import os
import re
import sys

LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. )?(\w+)(?: resumed>)?\((.*)$")
# A path argument: an optional dirfd decoded by -y (AT_FDCWD</cwd> or 3</dir>), then the string.
DIRFD_AND_PATH = re.compile(r'^(?:AT_FDCWD|-?\d+)<([^>]*)>,\s*"((?:[^"\\]|\\.)*)"')
PATH = re.compile(r'^"((?:[^"\\]|\\.)*)"')
RESULT = re.compile(r"\)\s+=\s+(-?\d+)")
# Syscalls whose first (or second, after a dirfd) argument is a path.
SYSCALLS = {
    "open", "openat", "openat2", "creat", "stat", "lstat", "newfstatat", "statx", "access", "faccessat",
    "faccessat2", "readlink", "readlinkat", "execve", "execveat", "chdir", "mkdir", "mkdirat", "unlink",
    "unlinkat", "rmdir", "rename", "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat",
    "truncate", "chmod", "fchmodat", "chown", "fchownat", "lchown", "utimensat", "statfs", "getxattr",
    "lgetxattr", "listxattr", "llistxattr", "inotify_add_watch", "mknod", "mknodat",
}


def unescape(s):
    return bytes(s, "utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8", "replace")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    trace, repo = sys.argv[1], os.path.realpath(sys.argv[2])
    parent = os.path.dirname(repo)
    home = os.path.expanduser("~")
    allowed = [
        repo,
        "/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin", "/etc", "/proc", "/sys", "/dev", "/run",
        "/var", "/tmp", "/nix/store",
        os.environ.get("TMPDIR", "/tmp"),
        os.environ.get("CARGO_HOME", os.path.join(home, ".cargo")),
        os.environ.get("RUSTUP_HOME", os.path.join(home, ".rustup")),
        sys.base_prefix,
    ] + [d for d in os.environ.get("PATH", "").split(":") if d.startswith("/")]
    # Looking at the folders on the way to an allowed place is not reading outside it.
    ancestors = {"/"}
    for a in allowed:
        p = a
        while p not in ("/", ""):
            ancestors.add(p)
            p = os.path.dirname(p)
    above_repo = set()
    p = parent
    while True:
        above_repo.add(p)
        if p == "/":
            break
        p = os.path.dirname(p)
    tool_lookups = {".cargo", "rust-toolchain", "rust-toolchain.toml", ".git", ".dockerenv"}

    def inside(path, root):
        return path == root or path.startswith(root.rstrip("/") + "/")

    def fine(path):
        if path in ancestors or any(inside(path, a) for a in allowed):
            return True
        rel = os.path.relpath(path, home)
        if not rel.startswith("..") and rel.startswith("."):
            return True  # a program's own settings or cache in the home folder
        # A tool looking for its settings in the folders above the repository.
        first_below = path
        while os.path.dirname(first_below) not in above_repo and first_below != "/":
            first_below = os.path.dirname(first_below)
        return os.path.dirname(first_below) in above_repo and os.path.basename(first_below) in tool_lookups

    cwd = {}
    pending = {}
    outside = {}
    with open(trace, errors="replace") as f:
        for line in f:
            m = LINE.match(line)
            if not m:
                continue
            pid, call, rest = m.groups()
            if call not in SYSCALLS:
                continue
            resumed = "resumed>" in line.split("(")[0]
            if resumed:
                if pid not in pending:
                    continue
                full, through, call = pending.pop(pid)
            else:
                d = DIRFD_AND_PATH.match(rest)
                if d:
                    base, path = d.group(1), unescape(d.group(2))
                    if rest.startswith("AT_FDCWD"):
                        cwd[pid] = base
                else:
                    p = PATH.match(rest)
                    if not p:
                        continue
                    path, base = unescape(p.group(1)), cwd.get(pid, repo)
                if path == "":
                    continue  # AT_EMPTY_PATH: the dirfd itself, already seen when it was opened
                joined = path if path.startswith("/") else os.path.join(base, path)
                full = os.path.normpath(joined)
                # A path that passes through a folder beside the repository on its
                # way back in ("../shared/x/../../repo/y") still needs that folder.
                walked, through = "/", None
                for part in joined.split("/"):
                    if part in ("", "."):
                        continue
                    walked = os.path.dirname(walked) if part == ".." else os.path.join(walked, part)
                    if part != ".." and not fine(walked):
                        through = walked
                        break
                if line.rstrip().endswith("<unfinished ...>"):
                    pending[pid] = (full, through, call)
                    continue
            result = RESULT.findall(line)
            if not result or int(result[-1]) < 0:
                continue  # nothing there: nothing was read
            if call == "chdir":
                cwd[pid] = full
            if not fine(full):
                outside.setdefault(full, set()).add(call)
            elif through:
                outside.setdefault(f"{full} (through {through})", set()).add(call)
    if outside:
        print(f"check-paths: the tests read {len(outside)} path(s) outside the repository ({repo}) that a fresh clone does not have:")
        for path in sorted(outside)[:50]:
            print(f"  {path}  ({', '.join(sorted(outside[path]))})")
        if len(outside) > 50:
            print(f"  ... and {len(outside) - 50} more")
        print("Keep what the tests need in the repository; read Flame's fixtures only through testing::flame_examples().")
        sys.exit(1)
    print(f"check-paths: no test read a path outside the repository ({repo}) that a fresh clone does not have")


if __name__ == "__main__":
    main()
