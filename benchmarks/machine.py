"""The machine and the versions a benchmark ran on, for the heading of its results."""

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("tensorflow", "keras", "ai-edge-litert")


def cpu_name():
    """The CPU's model name (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def installed(package):
    """The installed version of `package`, or "not installed"."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def kerasq_revision():
    """kerasq's git revision, marked when kerasq/ has uncommitted changes; "unknown" outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "kerasq"], cwd=root, capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return (rev or "unknown") + (" with uncommitted changes in kerasq/" if dirty.strip() else "")


def describe(extra_packages=()):
    """"CPU, cores; Python, the packages' versions, kerasq's git revision", for a results heading."""
    packages = ", ".join(f"{name} {installed(name)}" for name in PACKAGES + tuple(extra_packages))
    return (
        f"{cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}, {packages}, "
        f"kerasq git {kerasq_revision()}"
    )
