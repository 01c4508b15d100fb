"""The release's DiffC time schedules (spec §2.4) and rate control by recon time (§6.10).

Schedule entries are the release's integer noise levels T in {0..1000}; cod uses one time per step,
t = 1 - T / 1000 in CoD's convention (t = 1 clean), for the network and the algebra alike (spec §6.4).
"""
from __future__ import annotations

ENCODING_TIMESTEPS = (
    972, 949, 929, 897, 869, 834, 805, 780, 751, 726, 704, 688, 670, 648, 627, 608, 591, 578, 561, 546, 530, 520,
    510, 498, 491, 480, 465, 455, 447, 438, 429, 419, 410, 402, 390, 380, 371, 361, 353, 345, 336, 326, 319, 313,
    305, 296, 289, 282, 276, 269, 261, 254, 247, 242, 237, 231, 224, 219, 213, 209, 204, 200, 194, 189, 185, 181,
    175, 170, 167, 163, 160, 156, 153, 149, 146, 143, 139, 135, 132, 129, 125, 121, 118, 116, 113, 110, 107, 104,
    101, 99, 96, 94, 92, 90, 87, 85, 82, 80, 78, 76, 74, 72, 70, 68, 66, 64, 62, 60, 58, 56, 54, 52, 50,
    *range(48, 1, -1))
DENOISING_TIMESTEPS = (*range(981, 20, -20), 10, 5, 0)
RECON_TIMESTEPS = {"pixel": (*range(900, 99, -100), *range(90, 19, -10)),
                   "latent": (*range(900, 99, -100), *range(90, 19, -10), *range(10, 1, -1))}
SCHEDULES = {0: (ENCODING_TIMESTEPS, DENOISING_TIMESTEPS)}  # schedule id (a file's byte) -> lists
assert len(ENCODING_TIMESTEPS) == 160 and ENCODING_TIMESTEPS[141] == 20 and len(DENOISING_TIMESTEPS) == 52


def to_time(T: int) -> float:
    return 1.0 - T / 1000.0


def encoding_times(schedule: int = 0) -> list[float]:
    return [to_time(T) for T in SCHEDULES[schedule][0]]


def steps_for_recon_t(T: float, schedule: int = 0) -> int:
    """K for a requested recon timestep: the first schedule entry <= T is the last one sent (the release's rule);
    a T below every entry sends the whole schedule."""
    steps = SCHEDULES[schedule][0]
    for k, Tk in enumerate(steps):
        if Tk <= T:
            return k + 1
    return len(steps)


def last_noise_level(K: int, schedule: int = 0) -> int:
    """T_K: the noise level after K steps (1000, pure noise, for K = 0)."""
    return SCHEDULES[schedule][0][K - 1] if K else 1000


def denoise_times(K: int, schedule: int = 0) -> list[float]:
    """The probability-flow grid after K steps: t_K, then the denoising entries below T_K, ending at t = 1."""
    T_K = last_noise_level(K, schedule)
    return [to_time(T_K)] + [to_time(T) for T in SCHEDULES[schedule][1] if T < T_K]
