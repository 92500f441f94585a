# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""LinearSpec's verify tree: the chain of drafts plus the drafter's runner-up tokens, verified in one forward.

A diffusion draft of slots 1..D gives, at every slot, a distribution over tokens; the chain verifies only its top
token per slot. When the verifier rejects slot f, its token is often the drafter's second or third choice there. The
tree adds, for each of the first `slots` draft slots, the `width - 1` runner-ups of that slot as siblings of its
chain node, each followed by the chain's draft of the next slot (a diffusion draft of slot f+1 does not depend on
the token at slot f: both were masks in the draft forward). Every node attends to the cached prefix and to its
ancestors only, at the position of its depth, so each node's verify logits are exactly the causal (AR) logits of
its path: greedy acceptance along any path is lossless.

Node order, for D drafts, width w and s branching slots (s <= D):

    0 .. D                       the chain: the seed (node 0, the previous AR token) and drafts d_1..d_D
    then per slot f = 1..s, per runner-up r = 1..w-1:
        sibling(f, r)            runner-up r of slot f, child of chain node f-1, depth f
        continuation(f, r)       d_{f+1} after that sibling, depth f+1 (only when f < D)

Greedy acceptance: the chain is accepted while d_j equals the verifier's token after chain node j-1 (`accepted`
drafts). If it stops at slot f = accepted + 1 <= s and a sibling of slot f equals the verifier's token there, that
sibling is accepted, and its continuation too if it equals the verifier's token after the sibling. The row emits
the accepted path's tokens and the verifier's token after the path's last node, and keeps the path's K/V.
"""

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VerifyTree:
    """The static layout of one tree (see the module docstring); tensors on one device.

    depth:         [N]        position offset of each node after the row's cached prefix (the seed at 0).
    ancestors:     [N, N]     ancestors[n, m]: node n attends to node m (m on n's path, n itself included).
    siblings:      [s, w-1]   node index of sibling(f, r) (f = 1..s as rows 0..s-1).
    continuations: [s, w-1]   node index of continuation(f, r), -1 where slot f is the last draft slot.
    """

    num_drafts: int
    width: int
    slots: int
    depth: torch.Tensor
    ancestors: torch.Tensor
    siblings: torch.Tensor
    continuations: torch.Tensor

    @property
    def size(self) -> int:
        return self.depth.numel()

    def tokens(self, seeds, drafts, runner_ups):
        """Node tokens [live, N] from seeds [live], drafts [live, D] and runner-ups [live, D, w-1]."""
        columns = [seeds[:, None], drafts]
        for f in range(1, self.slots + 1):
            for r in range(self.width - 1):
                columns.append(runner_ups[:, f - 1, r : r + 1])
                if f < self.num_drafts:
                    columns.append(drafts[:, f : f + 1])
        return torch.cat(columns, dim=1)

    def accept_greedy(self, tokens, targets):
        """Greedy acceptance of every row.

        tokens:  [live, N] node tokens; targets: [live, N] the verifier's greedy token after each node.
        Returns (path [live, P], path_length [live], emitted [live, P]): the node indices of each row's accepted
        path (seed first; entries past path_length repeat the last node), their number, and the tokens to emit
        (path_length of them: the path's tokens after the seed, then the verifier's token after the path)."""
        live, d = tokens.shape[0], self.num_drafts
        rows = torch.arange(live, device=tokens.device)
        chain_hits = (tokens[:, 1 : d + 1] == targets[:, :d]).long()
        accepted = chain_hits.cumprod(dim=1).sum(dim=1)  # [live] in 0..D
        branch = (accepted < self.slots) & (accepted < d)
        slot_row = accepted.clamp(max=self.slots - 1)
        sibling_nodes = self.siblings[slot_row]  # [live, w-1]
        target_at_fail = targets[rows, accepted]  # the verifier's token after chain node `accepted`
        sibling_hits = (tokens.gather(1, sibling_nodes) == target_at_fail[:, None]) & branch[:, None]
        took_sibling = sibling_hits.any(dim=1)
        choice = sibling_hits.long().argmax(dim=1)  # at most one sibling equals the verifier's token
        sibling = sibling_nodes[rows, choice]
        continuation = self.continuations[slot_row][rows, choice]
        took_continuation = took_sibling & (continuation >= 0)
        continuation = continuation.clamp(min=0)
        took_continuation &= tokens[rows, continuation] == targets[rows, sibling]
        path_length = 1 + accepted + took_sibling.long() + took_continuation.long()

        longest = int(path_length.max())
        steps = torch.arange(longest, device=tokens.device)[None, :].expand(live, -1)
        path = steps.clone()  # chain nodes 0..accepted
        at_sibling = steps == (accepted + 1)[:, None]
        at_continuation = steps == (accepted + 2)[:, None]
        path = torch.where(at_sibling & took_sibling[:, None], sibling[:, None], path)
        path = torch.where(at_continuation & took_continuation[:, None], continuation[:, None], path)
        last = path.gather(1, (path_length - 1)[:, None])  # [live, 1]
        path = torch.where(steps < path_length[:, None], path, last)
        # The path's tokens after the seed, then the verifier's token after the path's last node.
        emitted = torch.cat([tokens.gather(1, path)[:, 1:], torch.zeros_like(last)], dim=1)
        emitted = emitted.scatter(1, (path_length - 1)[:, None], targets.gather(1, last))
        return path, path_length, emitted


@functools.lru_cache(maxsize=32)
def verify_tree(num_drafts: int, width: int, slots: int, device) -> VerifyTree:
    """The tree for `num_drafts` drafts (>= 1), `width` candidates per branching slot (>= 2) and the first `slots`
    draft slots branching (clipped to num_drafts)."""
    slots = max(1, min(slots, num_drafts))
    parent, depth = [-1] + list(range(num_drafts)), list(range(num_drafts + 1))
    siblings = [[0] * (width - 1) for _ in range(slots)]
    continuations = [[-1] * (width - 1) for _ in range(slots)]
    for f in range(1, slots + 1):
        for r in range(width - 1):
            siblings[f - 1][r] = len(parent)
            parent.append(f - 1)
            depth.append(f)
            if f < num_drafts:
                continuations[f - 1][r] = len(parent)
                parent.append(len(parent) - 1)
                depth.append(f + 1)
    n = len(parent)
    ancestors = torch.zeros(n, n, dtype=torch.bool)
    for node in range(n):
        m = node
        while m >= 0:
            ancestors[node, m] = True
            m = parent[m]
    device = torch.device(device)
    return VerifyTree(
        num_drafts=num_drafts,
        width=width,
        slots=slots,
        depth=torch.tensor(depth, device=device),
        ancestors=ancestors.to(device),
        siblings=torch.tensor(siblings, device=device),
        continuations=torch.tensor(continuations, device=device),
    )


__all__ = ["VerifyTree", "verify_tree"]
