"""Grain input pipeline over a prepared data set, and whole-split reads for evaluation.

make_iterator: ArrayRecord shards -> decode + validate -> per-process slice -> shuffle (reshuffled each epoch) ->
repeat -> optional random horizontal flip -> batch -> model space. Every random choice is a pure function of the
seed and the element index, so `get_state()`/`set_state()` resume to bitwise-identical batches.
"""

import os
from pathlib import Path

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from data.meta import prepare_hint, to_model
from data.records import ALLOWED_DTYPES, RecordError, decode_record
from training.errors import UserError, first_line


def _shard_paths(meta: dict, data_dir, split: str) -> tuple[list[str], list[int]]:
    """Shard paths of a split and their record counts; a missing/unreadable/short shard is a one-line UserError."""
    data_dir = Path(data_dir)
    if split not in meta["splits"]:
        raise UserError(f"data set {meta['name']!r} has no split {split!r}; it has {', '.join(meta['splits'])}")
    hint = f"re-prepare it: {prepare_hint(data_dir, meta)}"
    paths, counts = [], []
    for f in meta["splits"][split]["files"]:
        p = data_dir / f
        if not p.is_file():
            raise UserError(f"shard {p} is missing: {hint}")
        try:  # opens the file and reads its index: catches truncated or foreign files now rather than mid-training
            counts.append(len(grain.sources.ArrayRecordDataSource([str(p)])))
        except Exception as e:
            raise UserError(f"shard {p} is not a readable ArrayRecord file ({first_line(e, 120)}): "
                            f"{hint}") from None
        paths.append(str(p))
    if sum(counts) != meta["splits"][split]["num_records"]:
        raise UserError(f"split {split!r} in {data_dir} has {sum(counts)} records but meta.json says "
                        f"{meta['splits'][split]['num_records']}: {hint}")
    return paths, counts


def _locate(index: int, paths: list[str], counts: list[int]) -> str:
    """'<file> record <position>' for a global record index (for error messages)."""
    for p, c in zip(paths, counts):
        if index < c:
            return f"{p} record {index}"
        index -= c
    return f"record {index} past the end"


class _Source(grain.sources.ArrayRecordDataSource):
    """ArrayRecord source whose read errors name the shard and record (ArrayRecord's own messages do not)."""

    def __init__(self, paths, counts):
        super().__init__(paths)
        self.shard_paths, self.shard_counts = paths, counts

    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except Exception as e:
            where = _locate(int(index), self.shard_paths, self.shard_counts)
            if "Too many open files" in str(e):   # Grain keeps each shard it read open: not the shard's fault
                raise UserError(f"cannot open {where}: too many open files ({len(self.shard_paths)} shards in the "
                                f"split; `ulimit -n` is {_open_files_limit()}): raise it (`ulimit -n 65536`), or "
                                "re-prepare the set in fewer, larger shards") from None
            raise UserError(f"cannot read {where} ({first_line(e, 120)}): the shard is corrupt, re-prepare the "
                            "data set") from None


def _open_files_limit() -> str:
    import resource

    return str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


class _Decode:
    """Record bytes -> {"x": stored array (H,W,C), "label": int32}, checked against meta.json (picklable for
    workers)."""

    def __init__(self, meta: dict, paths: list[str], counts: list[int], caption: bool = False):
        self.shape, self.dtype, self.k = tuple(meta["shape"]), ALLOWED_DTYPES[meta["dtype"]], int(meta["num_classes"])
        self.paths, self.counts = paths, counts
        t = meta.get("text")  # stage 2: cached caption features (token states + padding mask) ride along
        self.text_shape = (int(t["max_tokens"]), int(t["dim"])) if t else None
        self.caption = caption   # load_text also wants the caption string (never batched: strings do not stack)

    def __call__(self, index: int, raw: bytes) -> dict:
        try:
            rec = decode_record(raw)
            x, label = rec.get("x"), rec.get("label")
            if not isinstance(x, np.ndarray) or x.shape != self.shape or x.dtype != self.dtype:
                raise RecordError(f"'x' should be {self.dtype} {self.shape}, got "
                                  f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < self.k:
                raise RecordError(f"'label' should be a class id in [0, {self.k}), got {label!r}")
            if self.text_shape is not None:
                text, mask = rec.get("text"), rec.get("mask")
                if not isinstance(text, np.ndarray) or text.shape != self.text_shape or \
                        not isinstance(mask, np.ndarray) or mask.shape != self.text_shape[:1]:
                    raise RecordError(f"'text' should be {self.text_shape} and 'mask' {self.text_shape[:1]}, got "
                                      f"{getattr(text, 'shape', text)!r} and {getattr(mask, 'shape', mask)!r}")
            if self.caption and not isinstance(rec.get("caption"), str):
                raise RecordError(f"'caption' should be a string, got {type(rec.get('caption')).__name__}")
        except RecordError as e:
            raise RecordError(f"bad record {index} ({_locate(index, self.paths, self.counts)}): {e}") from None
        out = {"x": x, "label": np.int32(label)}
        if self.text_shape is not None:
            out.update(text=text, mask=mask.astype(bool))
        if self.caption:
            out["caption"] = rec["caption"]
        return out


def _random_hflip(rec: dict, rng: np.random.Generator) -> dict:
    # The rng is seeded from (seed, element index), so the flip is part of the reproducible pipeline state.
    if rng.random() < 0.5:
        return {**rec, "x": rec["x"][:, ::-1]}
    return rec


class _ToModel:
    """Batch of stored values -> float32 model space (done per batch: one vectorised op instead of B small ones)."""

    def __init__(self, meta: dict):
        self.meta = {"shift": meta["shift"], "scale": meta["scale"]}

    def __call__(self, batch: dict) -> dict:
        out = {"x": to_model(batch["x"], self.meta), "label": batch["label"].astype(np.int32)}
        if "text" in batch:  # stage 2: token states (B, T, E) as stored (float16; the step widens them on the
            out.update(text=batch["text"], mask=batch["mask"].astype(bool))   # device: half the bytes) and mask
        return out


def _records(meta: dict, data_dir, split: str) -> grain.MapDataset:
    paths, counts = _shard_paths(meta, data_dir, split)
    # map_with_index directly on the source: the index is the global record index, used in error messages.
    return grain.MapDataset.source(_Source(paths, counts)).map_with_index(_Decode(meta, paths, counts))


def make_iterator(meta: dict, data_dir, split: str, *, batch_size: int, seed: int, shuffle: bool = True,
                  hflip: bool = False, workers: int = 0, process_index: int = 0, process_count: int = 1,
                  num_epochs: int | None = None, threads: int | None = None):
    """Checkpointable grain iterator yielding {"x": float32 (B,H,W,C), "label": int32 (B,)} (captioned sets also
    "text": float32 (B,T,E), "mask": bool (B,T)); repeats forever by
    default, reshuffled each epoch. Process p of P reads its own disjoint 1/P of the records.
    threads: Grain's reading threads (None: read_threads()); which records a batch holds does not depend on it."""
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} must lie in [0, {process_count})")
    if not 0 <= int(seed) < 2**32:
        raise UserError(f"data seed must lie in [0, 2**32), got {seed}")
    if hflip and meta.get("encoder"):
        # Mirroring a latent (or any encoder's features) is not the latent of the mirrored image.
        raise UserError(f"data set {meta['name']!r} holds encoded latents, which cannot be flipped on the fly: set "
                        "data.hflip=false (to train on flipped images, encode them with `prepare_data.py ... "
                        "hflip=true`)")
    ds = _records(meta, data_dir, split)
    # Equal-sized disjoint slices (dropping at most process_count-1 records) keep every process in lockstep.
    ds = ds[: len(ds) // process_count * process_count][process_index::process_count]
    if not 0 < batch_size <= len(ds):
        raise UserError(f"batch size {batch_size} (per process) must lie in [1, {len(ds)}]: split {split!r} of "
                        f"{meta['name']!r} has {meta['splits'][split]['num_records']} records over {process_count} "
                        "process(es)")
    ds = ds.seed(int(seed))
    if shuffle:
        ds = ds.shuffle()          # global index permutation, a different one each epoch after repeat()
    ds = ds.repeat(num_epochs)
    if hflip:
        ds = ds.random_map(_random_hflip)
    # Batch inside the MapDataset: one element of the iterator = one batch (stack.md: ~2x faster than batching later).
    ds = ds.batch(batch_size, drop_remainder=True).map(_ToModel(meta))
    threads = read_threads() if threads is None else int(threads)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
    if workers > 0:
        from absl import flags  # grain's worker code reads absl flags; pytest/Hydra never parse them

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it_ds)


def read_threads() -> int:
    """Grain's reading threads. The decode is Python under the GIL, so on 2 cores a second thread only fights the
    first (and the train step) for it: `python bench/loader.py data=fashion_mnist threads=1|2` read 53-56 batches/s
    at 18-19 CPU ms each with one thread, 43 at 31 ms with two (digits: 57-64 at 16-18 ms vs 35-38 at 32-34 ms;
    development_log.md, thirty-fifth session). Larger hosts keep up to 4 (more I/O to overlap; not measured here).
    Cores are those this process may run on (a Slurm job or `taskset` gets its share of a node, not the node)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 1 if cpus <= 2 else min(4, cpus)


def read_records(meta: dict, data_dir, split: str, caption: bool = False, start: int = 0):
    """(number of records, iterator of decoded + validated records in stored order) of a whole split, from record
    `start` on (the shards before it are not read); a corrupt shard or a bad record is a one-line UserError."""
    paths, counts = _shard_paths(meta, data_dir, split)
    decode = _Decode(meta, paths, counts, caption)

    def records():
        i = 0
        for path, count in zip(paths, counts):
            if i + count <= start:
                i += count
                continue
            # Sequential reads of ~READ_BYTES: ~3x faster than random access through grain for a full pass. Not
            # read_all: a shard of 7,500 captioned records with T5's 120 x 4096 features is 7 GB in memory.
            reader = ArrayRecordReader(path)
            step = max(1, min(count, READ_BYTES * count // max(1, os.path.getsize(path))))   # ~READ_BYTES a read
            first, i = max(0, start - i), max(i, start)
            try:
                for lo in range(first, count, step):
                    try:
                        raws = reader.read(lo, min(lo + step, count))
                    except Exception as e:
                        raise UserError(f"cannot read {path} ({first_line(e, 120)}): the shard is corrupt, "
                                        "re-prepare the data set") from None
                    for raw in raws:
                        yield decode(i, raw)
                        i += 1
            finally:
                reader.close()
    return sum(counts), records()


READ_BYTES = 64 << 20   # bytes of shard per sequential read in read_records (whole records, at least one)


def _records_at(meta: dict, data_dir, split: str, indices, caption: bool = False) -> list[dict]:
    """Decoded + validated records at these indices of a split (in the order given), by random access."""
    paths, counts = _shard_paths(meta, data_dir, split)
    source, decode = _Source(paths, counts), _Decode(meta, paths, counts, caption=caption)
    idx = [int(i) for i in np.asarray(indices).reshape(-1)]
    if any(not 0 <= i < len(source) for i in idx):
        raise UserError(f"record indices must lie in [0, {len(source)}) for split {split!r} of {meta['name']!r}")
    return [decode(i, source[i]) for i in idx]


class StoredImages:
    """The stored images ('x') of a split, read when asked: `take` by index, `chunks` in stored order. For metrics
    over a whole split (stage 2's end-of-run ranking), which load_split would hold in memory at once (a 100k-image
    folder at 256 px: 20 GB)."""

    def __init__(self, meta: dict, data_dir, split: str):
        self.meta, self.data_dir, self.split = meta, data_dir, split
        self.n = int(meta["splits"][split]["num_records"])

    def __len__(self) -> int:
        return self.n

    def take(self, indices) -> np.ndarray:
        return np.stack([rec["x"] for rec in _records_at(self.meta, self.data_dir, self.split, indices)])

    def chunks(self, size: int = 4096):
        n, records = read_records(self.meta, self.data_dir, self.split)
        x = np.empty((min(size, n), *self.meta["shape"]), ALLOWED_DTYPES[self.meta["dtype"]])
        k = 0
        for rec in records:
            x[k] = rec["x"]
            k += 1
            if k == len(x):
                yield x.copy()
                k = 0
        if k:
            yield x[:k].copy()


def load_split(meta: dict, data_dir, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All records of a split in stored order: (x in stored dtype (N,H,W,C), labels int64 (N,))."""
    n, records = read_records(meta, data_dir, split)
    x = np.empty((n, *meta["shape"]), ALLOWED_DTYPES[meta["dtype"]])
    y = np.empty(n, np.int64)
    for i, rec in enumerate(records):   # into preallocated arrays: no list of N small arrays
        x[i], y[i] = rec["x"], rec["label"]
    return x, y


def load_text(meta: dict, data_dir, split: str, indices=None) -> dict:
    """Cached caption features of a captioned split in stored order: {"text" float32 (N,T,E), "mask" bool (N,T),
    "caption" [N str]} (for sample grids and the stage-2 metric). `indices`: only these records (in the order given),
    read by random access, so that picking a few captions does not hold every caption's features in memory
    (Fashion-MNIST's 60,000: 1.5 GB as float32; a large captioned folder: more than the machine has)."""
    if not meta.get("text"):
        raise UserError(f"data set {meta['name']!r} has no captions (prepare a captioned set for stage 2)")
    if indices is None:
        _, records = read_records(meta, data_dir, split, caption=True)
    else:
        records = _records_at(meta, data_dir, split, indices, caption=True)
    text, mask, caption = [], [], []
    for rec in records:
        text.append(rec["text"]), mask.append(rec["mask"]), caption.append(rec["caption"])
    return {"text": np.stack(text).astype(np.float32), "mask": np.stack(mask).astype(bool), "caption": caption}
