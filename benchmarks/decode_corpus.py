"""The corpus table: every file class of amd_fast/data/corpus.py x every decoder the project offers.

    python benchmarks/decode_corpus.py                 # markdown table on stdout, rows to results/decode_corpus.csv
    python benchmarks/decode_corpus.py --windows 40    # more random windows per file

Per file and decoder: random windows (8 frames at stride 2, one TSN-style spread pick, the last frames) are read
through the decoder alone and through the decode check (amd_fast/data/decode_check.py), and compared with a
sequential PyAV decode. A cell says what the check decided -- ``exact`` (the decoder's own frames match),
``fixed by <path>`` (the decoder returned other frames on the probes; the file is read by that path), ``skipped``
(no path gives the right frames) -- and how many windows the decoder alone got wrong. ``WRONG`` would mean the
checked read returned a wrong frame: the contract is that it never does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amd_fast.data.corpus import sequential_frames, verify, windows, write_corpus  # noqa: E402
from amd_fast.data.dali import RequestReader  # noqa: E402
from amd_fast.data.decoders import available, select_decoder  # noqa: E402
from benchmarks.common import append_csv, machine_info  # noqa: E402


def decoders() -> dict[str, object]:
    out = {name: select_decoder(name) for name in ("torchcodec", "decord", "pyav", "dali") if available(name)}
    if available("dali"):
        out["dali pipeline (cpu)"] = RequestReader("cpu")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "outputs" / "decode_corpus"), help="where the corpus is written")
    p.add_argument("--windows", type=int, default=12, help="random windows per file and decoder")
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "decode_corpus.csv"))
    a = p.parse_args(argv)
    decs = decoders()
    stamp = machine_info()
    rows, table = [], {}
    with tempfile.TemporaryDirectory() as cache:  # a cold check per file and decoder
        for spec, path in write_corpus(a.out):
            ref = sequential_frames(path)
            picks = windows(len(ref), a.windows)
            for col, dec in decs.items():
                v = verify(dec, path, ref, picks, cache)
                table[spec.name, col] = v.cell
                rows.append({**stamp, "file": spec.name, "what": spec.what, "decoder": col, "mode": v.mode,
                             "windows": v.windows, "alone_wrong": v.raw_wrong, "damaged": v.raw_damaged,
                             "checked_wrong": v.checked_wrong, "skipped": v.skipped,
                             "check_ms": round(1e3 * v.seconds, 1), "note": v.note})  # fmt: skip
                if v.note:
                    print(f"  {spec.name} / {col}: {v.note}", file=sys.stderr)
    files = list(dict.fromkeys(f for f, _ in table))
    print("| file | " + " | ".join(decs) + " |")
    print("|---" * (len(decs) + 1) + "|")
    for f in files:
        print(f"| {f} | " + " | ".join(table[f, c] for c in decs) + " |")
    for row in rows:
        append_csv(a.csv, row)
    wrong = [r for r in rows if r["checked_wrong"]]
    print(f"\n{len(rows)} cells, {len(wrong)} with a wrong checked frame; rows appended to {a.csv}")
    if wrong:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
