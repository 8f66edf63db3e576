"""Read the records of an offline W&B run (``run-*.wandb``) without network.

wandb >= 0.19 writes them from its Go core and no longer ships the Python reader, so the
format is read here: a 7-byte header (":W&B", 2-byte magic, version), then LevelDB log
blocks of 32 KiB whose records (4-byte checksum, 2-byte length, 1-byte type: full, first,
middle, last) carry serialized ``wandb_internal_pb2.Record`` messages.
"""

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, chunks = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # block trailer: padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:
            pos += room  # zero-filled rest of the block
            continue
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        chunks = payload if kind in (FULL, FIRST) else chunks + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            yield record


def summary_keys(run_dir: str | Path) -> set[str]:
    """Keys of every summary update and history row of the offline run in ``run_dir``."""
    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    keys: set[str] = set()
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            keys |= {i.key or "/".join(i.nested_key) for i in record.summary.update}
        elif kind == "history":
            keys |= {i.key or "/".join(i.nested_key) for i in record.history.item}
    return keys


def run_record(run_dir: str | Path):
    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    return next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")
