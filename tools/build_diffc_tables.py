"""Build the two integer tables of DiffC (docs/diffc.md) in high precision and write them to cod/diffc/data/.

    python tools/build_diffc_tables.py            # rebuild and compare with the shipped files' SHA-256
    python tools/build_diffc_tables.py --write    # (re)write cod/diffc/data/*.bin

The shipped files are normative: cod never rebuilds them at run time (libm differs between machines); it
checks their SHA-256 on load (cod/diffc/tables.py). This script is how they were made (mpmath, 40 digits):

normal.i32  3,223 int32 LE: the uniform-word -> standard-normal table (spec §6.3). G(x) = -Phi^-1(x / 2^32);
            entries 0..255: round(2^24 G(v + 1/2)); then for e = 8..30, 129 knots
            round(2^24 G(2^e + i 2^(e-7) + 1/2)), i = 0..128.
zipf.u16    16 x 257 x 17 uint16 LE, [b - 1][Dq][e]: the octave tables of the truncated Zipf index model
            (spec §6.8), total 2^16 for each (b, Dq) over e = 0..b; entries e > b are 0.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import mpmath
import numpy as np

DATA = Path(__file__).resolve().parents[1] / "cod" / "diffc" / "data"
C0 = mpmath.mpf(1) / mpmath.e * mpmath.log(1 + mpmath.e)  # e^-1 ln(1 + e) = 0.48312197571606913...


def G(x) -> mpmath.mpf:
    p = mpmath.mpf(x) / 2 ** 32
    return -mpmath.sqrt(2) * mpmath.erfinv(2 * p - 1)


def normal_table() -> np.ndarray:
    values = [G(v + mpmath.mpf(0.5)) for v in range(256)]
    for e in range(8, 31):
        h = e - 7
        values += [G(2 ** e + i * 2 ** h + mpmath.mpf(0.5)) for i in range(129)]
    return np.array([int(mpmath.nint(v * 2 ** 24)) for v in values], dtype="<i4")


def zipf_table() -> np.ndarray:
    out = np.zeros((16, 257, 17), dtype="<u2")
    for dq in range(257):
        s = 1 + 1 / (mpmath.mpf(dq) / 16 + C0)
        # full octaves R in [2^e, 2^(e+1)) by the Hurwitz zeta: sum_{R=a}^{b-1} R^-s = zeta(s, a) - zeta(s, b)
        octave = [mpmath.zeta(s, 2 ** e) - mpmath.zeta(s, 2 ** (e + 1)) for e in range(16)]
        for b in range(1, 17):
            masses = octave[:b] + [mpmath.mpf(2 ** b) ** (-s)]  # the last octave holds R = 2^b alone
            total = mpmath.fsum(masses)
            f = [max(1, int(mpmath.floor(2 ** 16 * m / total))) for m in masses]
            top = max(range(len(f)), key=lambda i: (f[i], -i))  # the largest, lowest e on ties
            f[top] += 2 ** 16 - sum(f)
            assert sum(f) == 2 ** 16 and min(f) >= 1
            out[b - 1, dq, : b + 1] = f
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="write the files into cod/diffc/data/")
    args = p.parse_args()
    mpmath.mp.dps = 40
    from cod.diffc import tables

    ok = True
    for name, array in (("normal.i32", normal_table()), ("zipf.u16", zipf_table())):
        data = array.tobytes()
        digest = hashlib.sha256(data).hexdigest()
        expected = tables.SHA256[name]
        print(f"{name}: {len(data)} bytes, sha256 {digest} ({'matches' if digest == expected else 'DIFFERS from'} "
              f"the recorded {expected[:16]}...)")
        ok &= digest == expected
        if args.write:
            (DATA / name).write_bytes(data)
    return 0 if ok or args.write else 1


if __name__ == "__main__":
    sys.exit(main())
