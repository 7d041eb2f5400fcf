"""DraftTree: what a drafter proposes and the target verifies in one pass.

Nodes are listed parents-first. Node ``i`` has parent ``parents[i]`` (-1: a
child of the root, the last committed token). A chain is a tree with one
branch. ``q[i]`` is the drafter's distribution that node ``i`` was drawn from
(siblings drawn from one distribution share it); ``None`` for a node means
it was chosen deterministically (a point mass), which verifiers handle exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def depths_of(parents: list[int]) -> list[int]:
    """Each node's depth (0: a child of the root), from parent indices listed parents-first."""
    d: list[int] = []
    for p in parents:
        d.append(0 if p < 0 else d[p] + 1)
    return d


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    q: list[torch.Tensor | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.q:
            self.q = [None] * len(self.tokens)
        if not (len(self.tokens) == len(self.parents) == len(self.q)):
            raise ValueError("tokens, parents and q must have one entry per node")
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must precede children")

    @classmethod
    def chain(cls, tokens: list[int], q: list[torch.Tensor | None] | None = None) -> DraftTree:
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), list(q) if q else [])

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, q: torch.Tensor | None = None) -> int:
        """Append a node; returns its index."""
        if not -1 <= parent < len(self.tokens):
            raise ValueError(f"parent {parent} does not exist")
        self.tokens.append(token)
        self.parents.append(parent)
        self.q.append(q)
        return len(self.tokens) - 1

    @property
    def depths(self) -> list[int]:
        return depths_of(self.parents)

    def children(self) -> dict[int, list[int]]:
        """Parent index (-1 for the root) → child node indices, in order."""
        out: dict[int, list[int]] = {-1: []}
        for i, p in enumerate(self.parents):
            out.setdefault(p, []).append(i)
            out.setdefault(i, [])
        return out

    def subtree(self, nodes: list[int]) -> DraftTree:
        """The tree of ``nodes`` in the order given (each kept node's parent kept and listed
        before it), re-indexed."""
        index = {old: new for new, old in enumerate(nodes)}
        parents = []
        for old in nodes:
            p = self.parents[old]
            if p >= 0 and p not in index:
                raise ValueError(f"node {old} is kept but its parent {p} is not")
            parents.append(index[p] if p >= 0 else -1)
        return DraftTree([self.tokens[i] for i in nodes], parents, [self.q[i] for i in nodes])

    def path_to(self, node: int) -> list[int]:
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def with_root(self) -> tuple[torch.Tensor, list[int]]:
        """Attention mask and depth offsets of the pass [root] + nodes.

        Row/column 0 is the root (the pending committed token); node ``i`` is
        row ``i + 1``. Every row sees the root, itself and its ancestors.
        Returns the (n+1, n+1) bool mask and the depth of each row (root 0).
        """
        n = len(self.tokens)
        mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
        mask[:, 0] = True
        for i, p in enumerate(self.parents):
            row = i + 1
            if p >= 0:
                mask[row] = mask[p + 1]
            mask[row, row] = True
        return mask, [0] + [d + 1 for d in self.depths]

    @classmethod
    def weighted_trie(
        cls, paths: list[list[int]], weights: list[float], max_nodes: int
    ) -> tuple[DraftTree, list[float]]:
        """The trie of token sequences, pruned to the ``max_nodes`` heaviest nodes, heaviest
        first, and each node's weight.

        A node weighs the sum of the weights of the sequences through it, so a
        child never outweighs its parent: keeping the heaviest nodes (ties to
        the shallower one, then to the earlier sequence) keeps every kept
        node's parent, and in that order every prefix of the nodes is a tree.
        Deterministic proposals (``q`` None) from retrieval-style drafters:
        siblings are distinct tokens by construction.
        """
        key_of: dict[tuple[int, ...], int] = {}  # prefix -> node id in build order
        weight: list[float] = []
        parent: list[int] = []
        token: list[int] = []
        depth: list[int] = []
        for path, w in zip(paths, weights, strict=True):
            prev = -1
            for d, t in enumerate(path):
                key = tuple(path[: d + 1])
                node = key_of.get(key)
                if node is None:
                    node = key_of[key] = len(token)
                    token.append(t)
                    parent.append(prev)
                    weight.append(0.0)
                    depth.append(d)
                weight[node] += w
                prev = node
        keep = sorted(range(len(token)), key=lambda i: (-weight[i], depth[i], i))[:max_nodes]
        index = {old: new for new, old in enumerate(keep)}
        tree = cls(
            [token[i] for i in keep],
            [index[parent[i]] if parent[i] >= 0 else -1 for i in keep],
        )
        return tree, [weight[i] for i in keep]
