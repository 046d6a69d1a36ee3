"""Pages of the KV cache and the prefix cache over them.

A page holds `page_size` positions of every layer. Full pages of committed tokens are registered
under their prefix hash (prefix_hash.py) and can be shared by later sequences with the same prefix.
A page whose last user leaves goes to the back of the free list but keeps its hash, so it can still
be hit; it is evicted (its hash forgotten, a `removed` event) only when the free list reaches it. A
page with no hash (look-ahead past the valid cache, a partial last page) holds nothing to hit: it
goes to the front and is reused first, so the pages a decode step trims and the next one takes back
are the same ones, and no cached prefix is evicted while such a page is free.
"""

from collections import OrderedDict, deque

from orthrus_engines.engine.sequence import Sequence
from orthrus_engines.prefix_hash import next_page_hash, page_hashes


class PageManager:
    def __init__(self, num_pages: int, page_size: int, seed: str, enable_prefix_cache: bool = True):
        self.num_pages = num_pages
        self.page_size = page_size
        self.seed = seed
        self.enable_prefix_cache = enable_prefix_cache
        self.ref_count = [0] * num_pages
        self.page_hash: list[str | None] = [None] * num_pages
        self.hash_to_page: dict[str, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(num_pages))  # LRU order
        # ("stored" | "removed" | "cleared", hashes); a deque so another thread may drain it safely
        self.events: deque[tuple[str, list[str]]] = deque()

    @property
    def num_free(self) -> int:
        return len(self.free)

    def pages_for(self, num_positions: int) -> int:
        return -(-num_positions // self.page_size)

    # -- prefix cache -------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> None:
        """Attach the cached pages of the longest cached prefix of the sequence's prefill target."""
        if not self.enable_prefix_cache:
            return
        for h in page_hashes(seq.token_ids[: seq.prefill_target], self.page_size, self.seed):
            page = self.hash_to_page.get(h)
            if page is None:
                break
            self._ref(page)
            seq.page_table.append(page)
            seq.page_hashes.append(h)
        seq.num_cached = len(seq.page_table) * self.page_size
        if seq.completion_tokens == 0:  # a recompute after preemption keeps the first figure
            seq.cached_prompt_tokens = seq.num_cached

    def register_full_pages(self, seq: Sequence) -> None:
        """Name every newly completed page of valid KV by its prefix hash."""
        if not self.enable_prefix_cache:
            return
        stored = []
        parent = seq.page_hashes[-1] if seq.page_hashes else self.seed
        for b in range(len(seq.page_hashes), seq.num_cached // self.page_size):
            parent = next_page_hash(parent, seq.token_ids[b * self.page_size : (b + 1) * self.page_size])
            seq.page_hashes.append(parent)
            page = seq.page_table[b]
            if parent not in self.hash_to_page and self.page_hash[page] is None:
                self.hash_to_page[parent] = page
                self.page_hash[page] = parent
                stored.append(parent)
        if stored:
            self.events.append(("stored", stored))

    def drain_events(self) -> list[tuple[str, list[str]]]:
        out = []
        while self.events:
            out.append(self.events.popleft())
        return out

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix (pages in use stay with their sequences, unnamed)."""
        for h, page in list(self.hash_to_page.items()):
            self.page_hash[page] = None
        self.hash_to_page.clear()
        self.events.append(("cleared", []))

    # -- allocation ---------------------------------------------------------------------------
    def _ref(self, page: int) -> None:
        if self.ref_count[page] == 0:
            del self.free[page]
        self.ref_count[page] += 1

    def _take_free_page(self) -> int:
        page, _ = self.free.popitem(last=False)
        old = self.page_hash[page]
        if old is not None:  # evict from the prefix cache
            del self.hash_to_page[old]
            self.page_hash[page] = None
            self.events.append(("removed", [old]))
        self.ref_count[page] = 1
        return page

    def ensure(self, seq: Sequence, num_positions: int) -> bool:
        """Give the sequence pages for `num_positions` positions; False (nothing taken) if short."""
        need = self.pages_for(num_positions) - len(seq.page_table)
        if need > self.num_free:
            return False
        for _ in range(max(need, 0)):
            seq.page_table.append(self._take_free_page())
        return True

    def _release(self, page: int) -> None:
        self.ref_count[page] -= 1
        if self.ref_count[page] == 0:
            self.free[page] = None  # hashed: most recently freed, evicted last
            if self.page_hash[page] is None:
                self.free.move_to_end(page, last=False)  # nothing cached in it: reused first

    def trim(self, seq: Sequence) -> None:
        """Rollback: free the pages past the valid cache length."""
        keep = self.pages_for(seq.num_cached)
        while len(seq.page_table) > keep:
            self._release(seq.page_table.pop())

    def free_all(self, seq: Sequence) -> None:
        for page in reversed(seq.page_table):
            self._release(page)
        seq.page_table.clear()
        seq.page_hashes.clear()
        seq.num_cached = 0
