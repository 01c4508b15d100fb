"""TEMPORARY STUB (constriction) with the rans branch's API, until it lands. Not committed."""
from __future__ import annotations
import numpy as np
import constriction
from cod.errors import CodError
from cod.entropy.tables import PRECISION

class StreamError(CodError):
    pass

def _model(f):
    return constriction.stream.model.Categorical(np.asarray(f, np.float64) / f.sum(), perfect=False)

def encode(symbols, freqs, table_index=None, *, lanes=None, precision=PRECISION):
    symbols = np.asarray(symbols, np.int64); freqs = np.asarray(freqs)
    ti = np.zeros(len(symbols), np.int64) if table_index is None else np.asarray(table_index)
    enc = constriction.stream.queue.RangeEncoder()
    for s, t in zip(symbols, ti):
        enc.encode(np.array([s], np.int32), _model(freqs[t]))
    return enc.get_compressed().tobytes()

class Decoder:
    def __init__(self, data, *, lanes=None, precision=PRECISION):
        self.dec = constriction.stream.queue.RangeDecoder(np.frombuffer(bytes(data) + b"\0" * (-len(data) % 4), np.uint32))
    def decode(self, freqs, table_index=None, n=None):
        freqs = np.asarray(freqs)
        ti = np.zeros(n, np.int64) if table_index is None else np.asarray(table_index)
        return np.array([self.dec.decode(_model(freqs[t]), 1)[0] for t in ti], np.int64)
    def finish(self):
        pass

def decode(data, freqs, table_index=None, n=None, **kw):
    d = Decoder(data); out = d.decode(freqs, table_index, n); d.finish(); return out
