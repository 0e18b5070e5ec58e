#!/usr/bin/env python3
"""Measure the appliance itself: upload, boot, and daemon round trips, one at a time and sent ahead.

Usage: .venv/bin/python contrib/bench/appliance.py URI DOMAIN [--fresh-upload] [--calls N]

--fresh-upload deletes this appliance version's volumes from the pool first,
so the upload is measured too.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from virtmount.appliance import ApplianceSettings, boot_appliance  # noqa: E402
from virtmount.sources.domain import domain_source  # noqa: E402
from virtmount.virt.connection import close_connection, open_connection, run_blocking  # noqa: E402
from virtmount.virt.provision import prepare_local_appliance, provision, volume_names  # noqa: E402


async def _delete_uploaded(conn, pool_name: str) -> None:  # type: ignore[no-untyped-def]
    local = await trio.to_thread.run_sync(prepare_local_appliance)
    pool = await run_blocking(conn.storagePoolLookupByName, pool_name)
    for name in volume_names(local.content_hash).values():
        try:
            volume = await run_blocking(pool.storageVolLookupByName, name)
        except Exception:
            continue
        await run_blocking(volume.delete, 0)


async def main(uri: str, domain: str, fresh_upload: bool, calls: int) -> None:
    settings = ApplianceSettings()
    conn = await open_connection(uri)
    try:
        if fresh_upload:
            await _delete_uploaded(conn, settings.pool)
        local = await trio.to_thread.run_sync(prepare_local_appliance)
        sizes = sum(path.stat().st_size for path in (local.kernel, local.initrd, local.root_qcow2))
        started = time.monotonic()
        await provision(conn, settings.pool)
        print(f"provision (upload {'included' if fresh_upload else 'skipped: already on host'}): "
              f"{time.monotonic() - started:.2f} s for {sizes / 1e6:.0f} MB "
              f"(kernel+initrd+compressed root)")
        host = await provision(conn, settings.pool)
        async with trio.open_nursery() as nursery:
            started = time.monotonic()
            source = await domain_source(conn, domain, settings.writable)
            appliance = await boot_appliance(conn, source, host, settings, nursery)
            print(f"boot until the daemon answered: {time.monotonic() - started:.2f} s "
                  f"(of which this domain: {appliance.boot_seconds:.2f} s)")
            client = appliance.client
            roots = await client.inspect_os()
            await client.mount_ro(roots[0] if roots else (await client.list_devices())[0], "/")
            await client.lstatns(b"/")
            started = time.monotonic()
            for _ in range(calls):
                await client.lstatns(b"/")
            one_at_a_time = (time.monotonic() - started) / calls
            started = time.monotonic()
            async with trio.open_nursery() as ahead:
                for _ in range(calls):
                    ahead.start_soon(client.lstatns, b"/")
            sent_ahead = (time.monotonic() - started) / calls
            print(f"lstatns round trip: {one_at_a_time * 1e3:.3f} ms one at a time, "
                  f"{sent_ahead * 1e3:.3f} ms each with {calls} sent ahead")
            await appliance.shutdown()
    finally:
        await close_connection(conn)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("uri")
    parser.add_argument("domain")
    parser.add_argument("--fresh-upload", action="store_true")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    trio.run(main, args.uri, args.domain, args.fresh_upload, args.calls)
