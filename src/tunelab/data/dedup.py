"""Exact and near-duplicate detection that scales to millions of rows in bounded memory.

* **Exact**: a 64-bit BLAKE2b digest of the normalised text (NFKC, case-folded, punctuation
  and whitespace runs collapsed) per row; duplicates are found with ``numpy.unique`` on the
  digests, so memory is 8 bytes per row whatever the text length.
* **Near**: MinHash over *character* shingles (so Chinese, which has no spaces, works), with
  datasketch's ``affine32`` hash family (its permutations and MurmurHash3 pre-mix) and the LSH
  band/row split datasketch's ``MinHashLSH`` picks for the threshold (recall-weighted). datasketch hashes one
  shingle at a time in Python; here the same signatures are computed for thousands of rows at
  once with numpy (``test_data_dedup`` checks they equal datasketch's, value for value).
  Signatures and each band's keys are spooled to temporary files; LSH buckets are found by
  sorting one band's 64-bit keys at a time; candidate pairs are verified against the threshold
  with the signatures (read back only for the candidates) and joined with union-find. A
  cluster's representative is its first row.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunelab.errors import require

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)
_U32 = np.uint32
_MULT = _U32(0x01000193)  # FNV prime: the polynomial base of the shingle hash
NEAR_VERB = "near-duplicate detection (tunelab data dedup, clean, inspect, split, leakage)"


def require_datasketch() -> None:
    """A one-line error naming the ``[data]`` extra when datasketch (MinHash, LSH) is missing."""
    require("datasketch", extra="data", verb=NEAR_VERB)


def dedup_key(text: str) -> str:
    """The text duplicates are judged on: NFKC, case-folded, punctuation and spaces collapsed."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def digest64(text: str) -> int:
    """A stable 64-bit digest (BLAKE2b) of ``text``, as a signed int fitting ``int64``."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def shingle_hash(shingle: str) -> int:
    """The 32-bit hash of one shingle (the scalar twin of the vectorised one): h = h*p + c mod 2^32."""
    h = 0
    for ch in shingle:
        h = (h * int(_MULT) + ord(ch)) & 0xFFFFFFFF
    return h


def shingles(text: str, k: int) -> list[str]:
    """Character k-grams of ``text`` (the whole text when shorter than k; none when empty)."""
    if not text:
        return []
    if len(text) <= k:
        return [text]
    return [text[i : i + k] for i in range(len(text) - k + 1)]


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) as datasketch's MinHashLSH chooses them for ``threshold``, weighing a
    missed pair 9x a false candidate (candidates are verified on the signatures anyway)."""
    require_datasketch()
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
    return lsh.b, lsh.r


class MinHasher:
    """Vectorised MinHash signatures with datasketch's ``affine32`` permutations."""

    def __init__(self, num_perm: int = 128, k: int = 5, seed: int = 1):
        require_datasketch()
        from datasketch import MinHash

        self.num_perm, self.k, self.seed = num_perm, k, seed
        a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
        self.a, self.b = a.astype(_U32), b.astype(_U32)

    def signatures(self, texts: list[str], chunk_shingles: int = 65536) -> np.ndarray:
        """``(len(texts), num_perm)`` uint32 signatures; an empty text gets all 2^32-1."""
        out = np.full((len(texts), self.num_perm), np.iinfo(_U32).max, dtype=_U32)
        start = 0
        while start < len(texts):
            # take rows until about chunk_shingles shingles: bounds the (shingles x perms) block
            end, total = start, 0
            while end < len(texts) and (total == 0 or total + len(texts[end]) <= chunk_shingles):
                total += max(1, len(texts[end]))
                end += 1
            self._fill(texts[start:end], out[start:end])
            start = end
        return out

    def _fill(self, texts: list[str], out: np.ndarray) -> None:
        from datasketch.minhash import _fmix

        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        if not lengths.any():
            return
        codes = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=_U32)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        k = self.k
        # shingle i covers codes[i : i+k]; rows shorter than k have one shingle of their length
        n_sh = np.where(lengths == 0, 0, np.maximum(lengths - k + 1, 1))
        first = np.concatenate(([0], np.cumsum(n_sh)[:-1]))
        row_of = np.repeat(np.arange(len(texts)), n_sh)
        pos = np.arange(int(n_sh.sum()), dtype=np.int64) - first[row_of] + starts[row_of]
        width = np.minimum(lengths, k)[row_of]
        h = np.zeros(len(pos), dtype=_U32)
        padded = np.concatenate((codes, np.zeros(k, dtype=_U32)))
        short = np.flatnonzero(width < k)
        with np.errstate(over="ignore"):
            for j in range(k):
                h = h * _MULT + padded[pos + j]
            if len(short):  # rows shorter than k: hash only their own characters
                hs = np.zeros(len(short), dtype=_U32)
                for j in range(k):
                    use = width[short] > j
                    hs[use] = hs[use] * _MULT + padded[pos[short][use] + j]
                h[short] = hs
            hv = _fmix(h, 32)
            rows = np.flatnonzero(n_sh)
            for p0 in range(0, self.num_perm, 32):  # 32 permutations at a time: bounded memory
                block = hv[:, None] * self.a[None, p0 : p0 + 32] + self.b[None, p0 : p0 + 32]
                out[rows, p0 : p0 + 32] = np.minimum.reduceat(block, first[rows], axis=0)


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per band: equal keys = equal band (up to a 2^-64 collision)."""
    mult = np.random.default_rng(0).integers(1, 2**63, size=rows, dtype=np.uint64) | np.uint64(1)
    keys = np.zeros((sigs.shape[0], bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            part = sigs[:, b * rows : (b + 1) * rows].astype(np.uint64)
            keys[:, b] = (part * mult[None, :]).sum(axis=1) ^ np.uint64(b)
    return keys


class _UnionFind:
    """Union-find whose root is always the smallest index of its set (= the row kept)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent.get(x, x)
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo


@dataclass
class NearDupIndex:
    """Signatures of many texts, added in batches; then clusters at a Jaccard threshold.

    Nothing per row stays in RAM while adding: signatures go to a temporary file (512 bytes per
    row at 128 permutations) and each band's 64-bit keys to a file of its own. Clustering
    reads one band's keys at a time (8 bytes per row, plus the sort's working arrays), collects
    the candidate pairs, and reads only the candidates' signatures back (``os.pread``, in
    chunks) to verify them. Peak memory is therefore a few tens of bytes per row, whatever the
    text lengths. ``close()`` removes the files.
    """

    threshold: float = 0.8
    num_perm: int = 128
    k: int = 5
    seed: int = 1
    n: int = 0
    _dir: tempfile.TemporaryDirectory | None = None
    verify_chunk: int = 20_000  # candidate pairs whose signatures are read at once

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        self.hasher = MinHasher(self.num_perm, self.k, self.seed)
        self.bands, self.rows = lsh_params(self.threshold, self.num_perm)
        self._dir = tempfile.TemporaryDirectory(prefix="tunelab-minhash-")
        folder = Path(self._dir.name)
        self._path = folder / "signatures.u32"
        self._fh = open(self._path, "wb")  # noqa: SIM115 - closed in close()
        self._key_paths = [folder / f"band{b}.u64" for b in range(self.bands)]
        self._key_fhs = [open(kp, "wb") for kp in self._key_paths]  # noqa: SIM115 - closed in close()

    def add(self, texts: list[str], also: list[str] | None = None) -> None:
        """Add the (already normalised) texts of the next rows, in order.

        With ``also`` (a second text per row, e.g. the answer), a row's shingle set is the union
        of both texts' shingles (MinHash of a union = element-wise min), so no shingle spans the
        two fields and an edit at the end of one field does not also disturb the other.
        """
        if not texts:
            return
        sigs = self.hasher.signatures(texts)
        if also is not None:
            np.minimum(sigs, self.hasher.signatures(also), out=sigs)
        self._fh.write(sigs.tobytes())
        keys = band_keys(sigs, self.bands, self.rows)
        for b, fh in enumerate(self._key_fhs):
            fh.write(np.ascontiguousarray(keys[:, b]).tobytes())
        self.n += len(texts)

    def _flush(self) -> None:
        for fh in [self._fh, *self._key_fhs]:
            if not fh.closed:
                fh.flush()

    def _band(self, b: int) -> np.ndarray:
        return np.fromfile(self._key_paths[b], dtype=np.uint64, count=self.n)

    def signatures_of(self, rows: np.ndarray) -> np.ndarray:
        """The stored signatures of the given rows (any order), read from the file."""
        width = self.num_perm * 4
        self._flush()
        out = np.empty((len(rows), self.num_perm), dtype=_U32)
        fd = os.open(self._path, os.O_RDONLY)
        try:
            buf = b"".join(os.pread(fd, width, int(r) * width) for r in rows.tolist())
        finally:
            os.close(fd)
        out[:] = np.frombuffer(buf, dtype=_U32).reshape(len(rows), self.num_perm)
        return out

    def candidates(self, active: np.ndarray | None = None, cross: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Distinct candidate pairs ``(a, c)``, ``a < c``: rows sharing a band with ``a`` the first
        (smallest) row of that band's bucket, so pairs grow linearly with the rows."""
        self._flush()
        idx_all = None if active is None else np.flatnonzero(active)
        pairs = np.zeros(0, dtype=np.int64)
        for b in range(self.bands):
            col = self._band(b)
            members = np.arange(self.n, dtype=np.int64) if idx_all is None else idx_all
            if idx_all is not None:
                col = col[idx_all]
            order = np.argsort(col, kind="stable")
            same = col[order[1:]] == col[order[:-1]]
            del col
            if not same.any():
                continue
            members = members[order]
            del order
            starts = np.concatenate(([True], ~same))
            heads = members[np.flatnonzero(starts)][np.cumsum(starts) - 1]  # each run's first member
            pair = heads != members
            a, c = heads[pair], members[pair]
            if cross is not None:
                keep = cross[a] != cross[c]
                a, c = a[keep], c[keep]
            pairs = np.unique(np.concatenate((pairs, a * np.int64(self.n) + c)))
        return pairs // max(self.n, 1), pairs % max(self.n, 1)

    def clusters(self, active: np.ndarray | None = None, cross: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(root, similarity)`` per row: ``root[i]`` is the first row of i's cluster (i itself
        when alone); ``similarity[i]`` the estimated Jaccard to the row that linked it.

        ``active`` (bool per row) limits clustering to those rows. ``cross`` (an int per row,
        e.g. a file index) only links rows whose values differ (for leakage between files).
        """
        root = np.arange(self.n, dtype=np.int64)
        sim = np.zeros(self.n, dtype=np.float32)
        if self.n == 0:
            return root, sim
        a_all, c_all = self.candidates(active, cross)
        uf = _UnionFind()
        for s in range(0, len(a_all), self.verify_chunk):
            a, c = a_all[s : s + self.verify_chunk], c_all[s : s + self.verify_chunk]
            rows, inverse = np.unique(np.concatenate((a, c)), return_inverse=True)
            sigs = self.signatures_of(rows)
            est = (sigs[inverse[: len(a)]] == sigs[inverse[len(a) :]]).mean(axis=1)
            ok = est >= self.threshold
            for x, y, e in zip(a[ok].tolist(), c[ok].tolist(), est[ok].tolist(), strict=True):
                uf.union(x, y)
                sim[x] = max(sim[x], e)
                sim[y] = max(sim[y], e)
        for i in list(uf.parent):
            root[i] = uf.find(i)
        return root, sim

    def close(self) -> None:
        for fh in [self._fh, *self._key_fhs]:
            if not fh.closed:
                fh.close()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> NearDupIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def exact_duplicates(digests: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
    """For each row, the index of the first active row with the same digest (itself if first)."""
    first = np.arange(len(digests), dtype=np.int64)
    idx = np.arange(len(digests), dtype=np.int64) if active is None else np.flatnonzero(active)
    if not len(idx):
        return first
    _, inverse = np.unique(digests[idx], return_inverse=True)
    # the smallest index per digest group: scatter-min over groups
    group_first = np.full(inverse.max() + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(group_first, inverse, idx)
    first[idx] = group_first[inverse]
    return first


def near_duplicate_roots(texts: Iterable[str], *, threshold: float = 0.8, num_perm: int = 128, k: int = 5,
                         batch: int = 4096) -> np.ndarray:
    """Cluster roots for an in-memory list of texts (normalised here with :func:`dedup_key`)."""
    with NearDupIndex(threshold=threshold, num_perm=num_perm, k=k) as index:
        buf: list[str] = []
        for t in texts:
            buf.append(dedup_key(t))
            if len(buf) >= batch:
                index.add(buf)
                buf = []
        index.add(buf)
        return index.clusters()[0]


def tmp_dir_for(path: Path) -> str:
    """A folder for spool files next to ``path`` when writable (same disk), else the system's."""
    parent = Path(path).resolve().parent
    return str(parent) if os.access(parent, os.W_OK) else tempfile.gettempdir()
