"""The trainer's data: scored rollouts, the step schedule, the deal over ranks and micro-batches.

What a step is: `batch_seqs` rollouts (a deterministic per-epoch permutation of the scored items, seeded),
dealt to the ranks by length and cut into micro-batches (gradient accumulation). Row i of a rollout's
scores is compared with the student's hidden state at position P-1+i (see opd_score.py for the alignment).
"""
from __future__ import annotations

import torch

import opd_data
import opd_score
from opd_data import OpdInputError


def load_items(scores_dir: str) -> tuple[dict, list[dict]]:
    """Scored rollouts: token ids from the rollout files the scores name, teacher rows from the shards."""
    index, by_uid = opd_score.load_scores(scores_dir)
    items = []
    for src in index["rollouts"]:
        _, records = opd_data.read_rollouts(src["file"])
        for it in opd_data.flatten_samples(records, index.get("finished_only", False)):
            if it["uid"] in by_uid:
                rows = by_uid[it["uid"]]
                if rows["topk_ids"].shape[0] != len(it["completion_ids"]):
                    raise OpdInputError(f"scores for {it['uid']} have {rows['topk_ids'].shape[0]} rows but the rollout "
                                        f"has {len(it['completion_ids'])} tokens: {src['file']} changed after scoring")
                items.append({**it, **rows})
    if not items:
        raise OpdInputError(f"no scored rollouts in {scores_dir}")
    return index, items


def schedule(n_items: int, lengths: list[int], batch: int, seed: int, steps: int | None,
             token_budget: int | None) -> list[list[int]]:
    """Item indices of every step: epochs of seeded permutations, cut into batches; stops at --steps or
    once the tokens trained reach --token-budget (whichever comes first)."""
    out, tokens, epoch, stream = [], 0, 0, []
    while True:
        if steps is not None and len(out) >= steps:
            return out
        if token_budget is not None and tokens >= token_budget:
            return out
        while len(stream) < batch:
            g = torch.Generator().manual_seed(seed * 1000003 + epoch)
            stream += torch.randperm(n_items, generator=g).tolist()
            epoch += 1
        step, stream = stream[:batch], stream[batch:]
        out.append(step)
        tokens += sum(lengths[i] for i in step)


def collate(batch: list[dict], device) -> dict:
    """Right-padded input ids, each sequence's first loss row (P-1) and the teacher rows, concatenated."""
    ids, mask = opd_data.padded_batch(batch)
    teacher = {"lengths": [len(it["completion_ids"]) for it in batch]}
    for key in ("topk_ids", "topk_logp", "rest_logp"):
        teacher[key] = torch.cat([it[key] for it in batch]).to(device)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "starts": [len(it["prompt_ids"]) - 1 for it in batch], "teacher": teacher}


def micro_batches(mine: list[dict], micro: int) -> list[list[dict]]:
    """This rank's rollouts cut into micro-batches of `micro`, longest first, so each pads to a similar width."""
    order = sorted(mine, key=lambda it: -(len(it["prompt_ids"]) + len(it["completion_ids"])))
    return [order[i:i + micro] for i in range(0, len(order), micro)]


def rank_share(batch: list[dict], rank: int, world: int) -> list[dict]:
    """Deal the step's rollouts to the ranks by length (longest to rank 0, next to rank 1, ...): each rank
    gets about the same number of tokens; the global loss (a sum over all of them) is unchanged."""
    order = sorted(range(len(batch)), key=lambda i: (-(len(batch[i]["prompt_ids"]) + len(batch[i]["completion_ids"])), i))
    return [batch[i] for i in order[rank::world]]
