"""Where a run's images go, written so that a run killed at any moment (SIGKILL included) and started
again ends with the files an uninterrupted run makes: nothing missing, nothing twice, nothing torn.

- Every file is written by `files.atomic_write` (a temporary name in its folder, fsync, rename);
  temporaries left by a killed run are removed when the run starts again.
- OUT/index.jsonl names only finished files: a batch's lines are appended (one write, then fsync) after
  its files are in place. A line torn by a kill is dropped when the run starts again. A batch is done when
  the index names all of its items; otherwise it is made again (same inputs, same bytes) and only its
  missing lines are added. At the end the index is rewritten sorted by item index.
- png: OUT/00000.png, ... (zero-padded item index), the item's record as JSON in the PNG text chunk
  `parameters` (as `unclip-jax txt2img` writes it).
- webdataset: OUT/shard-00000.tar, ... each holding `KEY.png` and `KEY.json` (KEY the zero-padded item
  index) of a fixed run of batches. Finished batches wait in OUT/.partial/ until their shard is complete,
  then the shard is written whole and renamed into place; a shard file is always complete.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

from unclip_jax import files

PARTIAL = ".partial"


def remove_temporaries(folder: str) -> None:
    """Removes what a killed run left half-written in OUT and OUT/.partial: `files.atomic_path`'s
    temporaries, nothing else."""
    for base in (folder, os.path.join(folder, PARTIAL)):
        files.remove_temporaries(base)


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar of (name, bytes), reproducible: fixed times, owners and modes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read_tar(path: str) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


class Index:
    """OUT/index.jsonl (OUT/index.RANK.jsonl for process RANK of several): one JSON line per finished item."""

    def __init__(self, folder: str, process_index: int = 0, process_count: int = 1):
        self.folder = folder
        name = "index.jsonl" if process_count == 1 else f"index.{process_index:05d}.jsonl"
        self.path = os.path.join(folder, name)
        self.records: dict[int, dict] = {}

    def part_paths(self) -> list[str]:
        names = sorted(n for n in os.listdir(self.folder) if n.startswith("index.") and n.endswith(".jsonl"))
        return [os.path.join(self.folder, n) for n in names]

    def load(self) -> int:
        """Reads every index file of the folder (all processes'), keeping the complete lines whose file
        exists; rewrites this process's file without the rest. Returns how many lines were dropped."""
        dropped = 0
        mine: list[dict] = []
        for path in self.part_paths():
            with open(path, "rb") as f:
                raw = f.read()
            for line in raw.split(b"\n")[:-1] if raw.endswith(b"\n") else raw.split(b"\n"):
                try:
                    record = json.loads(line)
                    ok = isinstance(record, dict) and os.path.exists(os.path.join(self.folder, record["file"]))
                except (ValueError, KeyError, TypeError):
                    ok = False
                if not ok:
                    dropped += line.strip() != b""
                    continue
                self.records[int(record["index"])] = record
                if path == self.path:
                    mine.append(record)
        if os.path.exists(self.path) or mine:
            files.atomic_write(self.path, b"".join(_line(r) for r in mine))
        return dropped

    def add(self, records: list[dict]) -> None:
        """Appends the records of a finished batch in one write, then fsync."""
        new = [r for r in records if r["index"] not in self.records]
        if not new:
            return
        with open(self.path, "ab") as f:
            f.write(b"".join(_line(r) for r in new))
            f.flush()
            os.fsync(f.fileno())
        for r in new:
            self.records[r["index"]] = r

    def finish(self) -> None:
        """The folder's index as one file, index.jsonl, sorted by item index (call on one process, after
        every process has finished)."""
        records: dict[int, dict] = {}
        for path in self.part_paths():
            with open(path, "rb") as f:
                for line in f.read().splitlines():
                    try:
                        r = json.loads(line)
                        records[int(r["index"])] = r
                    except (ValueError, KeyError, TypeError):
                        continue
        data = b"".join(_line(records[i]) for i in sorted(records))
        files.atomic_write(os.path.join(self.folder, "index.jsonl"), data)
        for path in self.part_paths():
            if os.path.basename(path) != "index.jsonl":
                os.remove(path)


def _line(record: dict) -> bytes:
    return (json.dumps(record, sort_keys=True) + "\n").encode()
