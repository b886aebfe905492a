"""Progress bars on stderr. TQDM_DISABLE=1 in the environment turns them off (tqdm reads it)."""

from tqdm import tqdm


def bar(iterable=None, desc: str = "", unit: str = "it", total=None, enabled: bool = True):
    extra = {} if enabled else {"disable": True}
    return tqdm(iterable, desc=desc, unit=unit, total=total, mininterval=0.5, dynamic_ncols=True, **extra)
