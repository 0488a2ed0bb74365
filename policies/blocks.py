"""Paged KV block accounting for one GPU: which block ids are free, who holds the rest."""
from __future__ import annotations


class OutOfBlocks(RuntimeError):
    pass


class BlockPool:
    """A free list of block ids. The real engine uses the ids for block tables; the sim only counts."""

    __slots__ = ("device", "block_size", "num_blocks", "_free")

    def __init__(self, device: str, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"{device}: need at least one KV block of at least one token "
                             f"(got {num_blocks} blocks of {block_size})")
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def used_fraction(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"{self.device}: {n} KV blocks wanted, {len(self._free)} free")
        if n <= 0:
            return []
        ids = self._free[-n:]
        del self._free[-n:]
        return ids

    def grow(self, blocks: list[int], tokens: int) -> bool:
        """Extend `blocks` in place to hold `tokens`; False (and no change) if the pool is short."""
        need = -(-tokens // self.block_size) - len(blocks)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        blocks.extend(self._free[-need:])
        del self._free[-need:]
        return True

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)
        blocks.clear()
