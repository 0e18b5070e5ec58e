"""Build the slow cached test images the acceptance tests need before pytest starts, two at a time.

``make test`` runs this first. On a fresh machine (CI's) the images would otherwise be built one
after another inside the fixtures' set-up, each in a libguestfs appliance using one of the two
cores under TCG (together several minutes); here two builds run at once. Each job is the very
builder the fixtures call (cached, locked per image), so an image built here is the one they find,
and a job that fails here is only reported: the fixture that needs the image tries again and fails
there, where the tests show it.

Usage: ``python -m tests.prebuild [JOB...]`` (default: all jobs, longest first).
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from typing import Callable

from tests import fidelity, hostile_images, images, layouts

PARALLEL_BUILDS = 2  # these machines have 2 cores; each appliance build keeps one busy

# The images that take an appliance or much host work; the others take seconds and are left to their fixtures.
# Longest first (measured on a fresh machine here), so that the two lanes end close together.
JOBS: dict[str, Callable[[], object]] = {
    "zoo": lambda: layouts.build(layouts.ZOO),
    "hostile-names": hostile_images.odd_names_image,
    "fidelity": fidelity.build,
    "standard": lambda: images.build(images.STANDARD),
    "noos": lambda: images.build(images.NOOS),
    "mbr": lambda: layouts.build(layouts.MBR),
    "span": lambda: layouts.build(layouts.SPAN_DISKS),
    "hostile-corrupt": hostile_images.corrupt_images,
}


def _run(name: str) -> float:
    """Build job ``name`` (in a worker process); its time in seconds."""
    started = time.monotonic()
    JOBS[name]()
    return time.monotonic() - started


def main(argv: list[str]) -> int:
    unknown = [name for name in argv if name not in JOBS]
    if unknown:
        print(f"prebuild: unknown job {', '.join(unknown)} (jobs: {', '.join(JOBS)})", file=sys.stderr)
        return 2
    names = argv or list(JOBS)
    started = time.monotonic()
    failed = []
    # fork: the workers inherit JOBS (lambdas do not pickle); nothing here has threads or a guestfs handle yet
    with ProcessPoolExecutor(PARALLEL_BUILDS, mp_context=multiprocessing.get_context("fork")) as pool:
        futures: dict[Future[float], str] = {pool.submit(_run, name): name for name in names}
        for future in as_completed(futures):
            name = futures[future]
            try:
                print(f"prebuild: {name} ready in {future.result():.1f} s", flush=True)
            except Exception as error:  # reported, and left to the fixture that needs it
                failed.append(name)
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                print(f"prebuild: {name} failed: {first_line}", flush=True)
    print(f"prebuild: {len(names) - len(failed)} of {len(names)} jobs ready in {time.monotonic() - started:.1f} s"
          f" in {images.IMAGE_DIR}" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
