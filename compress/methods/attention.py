"""What attention looks like in each transformer family, so one head-pruning code path serves them all.

A :class:`Layout` names, relative to one block of the model, the module holding the head count, the q/k/v projections
(separate, or fused as in GPT-2), the output projection, the feed-forward pair, and the size attributes that follow the
head count. Projections are ``nn.Linear`` or transformers' ``Conv1D`` (weight stored transposed); :func:`keep_out` and
:func:`keep_in` slice either by output or input units. A family compress does not know is refused in one line that
names what was looked for.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CompressError


@dataclass(frozen=True)
class Layout:
    family: str
    blocks: tuple[str, ...]            # paths (from the base model) to the blocks, "*" for every item of a list
    attention: str                     # the module holding the head count (from a block)
    heads: str | None                  # its attribute: the number of heads (None: heads cannot be removed in this family)
    q: str | None = None               # separate projections (from a block); their output units are heads × head_dim
    k: str | None = None
    v: str | None = None
    qkv: str | None = None             # or one fused projection [q | k | v] (GPT-2's c_attn)
    out: str = ""                      # output projection: its input units are heads × head_dim
    more: tuple[str, ...] = ()         # other per-head projections, pruned like q (DeBERTa's relative-position ones)
    tables: tuple[str, ...] = ()       # parameters with one column per head (Swin's relative position bias)
    sizes: tuple[str, ...] = ()        # attributes of the attention module equal to heads × head_dim
    why_not: str = ""                  # with heads None: why, and what to do
    mlp_in: str = ""
    mlp_out: str = ""


LAYOUTS = (
    Layout("bert-like (BERT, RoBERTa, ELECTRA, CamemBERT, XLM-R, MiniLM)", ("encoder.layer",), "attention.self", "num_attention_heads",
           q="attention.self.query", k="attention.self.key", v="attention.self.value", out="attention.output.dense",
           sizes=("all_head_size",), mlp_in="intermediate.dense", mlp_out="output.dense"),
    Layout("deberta-v2", ("encoder.layer",), "attention.self", "num_attention_heads",
           q="attention.self.query_proj", k="attention.self.key_proj", v="attention.self.value_proj", out="attention.output.dense",
           more=("attention.self.pos_key_proj", "attention.self.pos_query_proj"), sizes=("all_head_size",),
           mlp_in="intermediate.dense", mlp_out="output.dense"),
    Layout("distilbert", ("transformer.layer",), "attention", "n_heads", q="attention.q_lin", k="attention.k_lin", v="attention.v_lin",
           out="attention.out_lin", mlp_in="ffn.lin1", mlp_out="ffn.lin2"),
    Layout("gpt2", ("h",), "attn", "num_heads", qkv="attn.c_attn", out="attn.c_proj", sizes=("split_size",),
           mlp_in="mlp.c_fc", mlp_out="mlp.c_proj"),
    Layout("vit (transformers)", ("layers", "encoder.layer"), "attention", "num_attention_heads", q="attention.q_proj",
           k="attention.k_proj", v="attention.v_proj", out="attention.o_proj", mlp_in="mlp.fc1", mlp_out="mlp.fc2"),
    Layout("swin (timm)", ("layers.*.blocks",), "attn", "num_heads", qkv="attn.qkv", out="attn.proj",
           tables=("attn.relative_position_bias_table",), mlp_in="mlp.fc1", mlp_out="mlp.fc2"),
    Layout("vit, deit, mobilevit (timm)", ("blocks", "stages.*.*.transformer"), "attn", "num_heads", qkv="attn.qkv", out="attn.proj",
           sizes=("attn_dim",), mlp_in="mlp.fc1", mlp_out="mlp.fc2"),
    Layout("vit (torchvision)", ("encoder.layers",), "self_attention", None, out="self_attention.out_proj", mlp_in="mlp.0", mlp_out="mlp.3",
           why_not="torchvision's ViT attends with nn.MultiheadAttention, whose width is the model's: its heads cannot be removed alone"),
    Layout("swin (torchvision)", ("features.*",), "attn", None, out="attn.proj", mlp_in="mlp.0", mlp_out="mlp.3",
           why_not="torchvision's shifted-window attention derives the head size from the model's width: its heads cannot be removed alone"),
)


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


@dataclass
class Block:
    """One transformer block as its layout sees it."""
    layout: Layout
    module: nn.Module

    def get(self, path: str | None) -> nn.Module | None:
        return _get(self.module, path) if path else None

    @property
    def attention(self) -> nn.Module:
        return self.get(self.layout.attention)

    @property
    def heads(self) -> int:
        if self.layout.heads is None:
            raise CompressError(f"{self.layout.why_not}", "Prune its feed-forward width alone: -s amount=0 -s mlp_amount=0.5")
        return int(getattr(self.attention, self.layout.heads))

    @property
    def head_dim(self) -> int:
        out = self.get(self.layout.out)
        return in_units(out) // self.heads

    def projections(self) -> list[tuple[nn.Module, int]]:
        """(module, offset of this block's q, k or v inside its output units): the per-head outputs to slice."""
        lay = self.layout
        if lay.qkv:
            fused = self.get(lay.qkv)
            width = self.heads * self.head_dim
            return [(fused, 0), (fused, width), (fused, 2 * width)]
        found = [self.get(p) for p in (lay.q, lay.k, lay.v, *lay.more)]
        return [(m, 0) for m in found if m is not None]


def _expand(root: nn.Module, path: str) -> list[nn.Module]:
    """The modules a path names; ``*`` stands for every child, and the last list's items are the result."""
    found = [root]
    for part in path.split(".") + ["*"]:
        found = [c for m in found for c in (m.children() if part == "*" else [getattr(m, part, None)]) if isinstance(c, nn.Module)]
    return found


def _fits(lay: Layout, block: nn.Module) -> bool:
    needed = [lay.attention, lay.out, lay.mlp_in, lay.mlp_out, *(p for p in (lay.q, lay.k, lay.v, lay.qkv) if p)]
    return all(_get(block, p) is not None for p in needed) and (lay.heads is None or hasattr(_get(block, lay.attention), lay.heads))


def blocks(model: nn.Module) -> list[Block]:
    """The model's transformer blocks, with the layout that fits them; one clear error for a family not known here."""
    inner = getattr(model, "model", model)               # compress's HFModel wraps the transformers model
    base = getattr(inner, "base_model", inner)
    for lay in LAYOUTS:
        for path in lay.blocks:
            found = [b for b in _expand(base, path) if _fits(lay, b)]
            if found:
                return [Block(lay, b) for b in found]
    kind = type(base).__name__
    raise CompressError(f"head pruning does not know the attention layout of {kind}: it looked for "
                        + "; ".join(f"{lay.family}: {lay.blocks[0]}[i].{lay.attention}" for lay in LAYOUTS),
                        "Use --method structured (channels), or a BERT-like, DistilBERT, DeBERTa-v2, GPT-2, ViT or Swin model")


# ---------------------------------------------------------------- Linear or Conv1D, sliced by units
def _conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")      # transformers' Conv1D: weight [in, out]


def out_units(m: nn.Module) -> int:
    return m.weight.shape[1] if _conv1d(m) else m.weight.shape[0]


def in_units(m: nn.Module) -> int:
    return m.weight.shape[0] if _conv1d(m) else m.weight.shape[1]


def out_weight(m: nn.Module) -> torch.Tensor:
    """The weight as [out units, in units]."""
    return m.weight.detach().t() if _conv1d(m) else m.weight.detach()


def keep_out(m: nn.Module, idx: torch.Tensor) -> None:
    """Keep output units ``idx`` (rows of a Linear, columns of a Conv1D) and their biases."""
    w = m.weight.data
    m.weight = nn.Parameter((w[:, idx] if _conv1d(m) else w[idx]).clone())
    if m.bias is not None:
        m.bias = nn.Parameter(m.bias.data[idx].clone())
    if _conv1d(m):
        m.nf = len(idx)
    else:
        m.out_features = len(idx)


def keep_in(m: nn.Module, idx: torch.Tensor) -> None:
    """Keep input units ``idx``."""
    w = m.weight.data
    m.weight = nn.Parameter((w[idx] if _conv1d(m) else w[:, idx]).clone())
    if not _conv1d(m):
        m.in_features = len(idx)


# ---------------------------------------------------------------- heads and feed-forward width
def head_units(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def magnitude_scores(block: Block) -> torch.Tensor:
    """Importance of a head: the magnitude of its q, k, v output rows and of its output-projection inputs."""
    h, d = block.heads, block.head_dim
    score = torch.zeros(h)
    for m, offset in block.projections():
        score += out_weight(m)[offset:offset + h * d].reshape(h, d, -1).norm(dim=(1, 2))
    return score + out_weight(block.get(block.layout.out)).reshape(-1, h, d).norm(dim=(0, 2))


def context_hook(block: Block, scores: torch.Tensor):
    """A forward pre-hook on the output projection adding each head's measured contribution to ``scores``."""
    def hook(module, args):
        ctx = args[0]                                             # [B, T, heads * d]
        h, d = block.heads, block.head_dim
        w = out_weight(module).reshape(-1, h, d)                  # [hidden, heads, d]
        per_head = torch.einsum("btkd,okd->btko", ctx.reshape(*ctx.shape[:-1], h, d), w)
        scores.add_(per_head.norm(dim=-1).mean(dim=(0, 1)))
    return block.get(block.layout.out).register_forward_pre_hook(hook)


def prune_heads(block: Block, n_remove: int, score: torch.Tensor) -> int:
    """Remove the ``n_remove`` least important heads (at least one stays); returns the heads kept."""
    h, d = block.heads, block.head_dim
    n_remove = min(n_remove, h - 1)
    if n_remove <= 0:
        return h
    keep = score.argsort(descending=True)[: h - n_remove].sort().values.tolist()
    idx = head_units(keep, d)
    lay = block.layout
    if lay.qkv:
        fused = block.get(lay.qkv)
        keep_out(fused, torch.cat([idx, idx + h * d, idx + 2 * h * d]))
    else:
        for m, _ in block.projections():
            keep_out(m, idx)
    keep_in(block.get(lay.out), idx)
    for path in lay.tables:
        owner, _, name = path.rpartition(".")
        table = getattr(block.get(owner), name)
        setattr(block.get(owner), name, nn.Parameter(table.data[..., torch.tensor(keep)].clone()))
    att = block.attention
    setattr(att, lay.heads, len(keep))
    for attr in lay.sizes:
        setattr(att, attr, len(idx))
    return len(keep)


def mlp_pair(block: Block) -> tuple[nn.Module, nn.Module]:
    return block.get(block.layout.mlp_in), block.get(block.layout.mlp_out)


def prune_mlp(block: Block, amount: float, round_to: int, score: torch.Tensor | None = None) -> int:
    """Keep the most important feed-forward units (a multiple of ``round_to``); returns the width kept."""
    up, down = mlp_pair(block)
    width = out_units(up)
    keep = min(width, max(round_to, int(round(width * (1 - amount) / round_to)) * round_to))
    if score is None:
        score = out_weight(up).norm(dim=1) * out_weight(down).norm(dim=0)
    idx = score.argsort(descending=True)[:keep].sort().values
    keep_out(up, idx)
    keep_in(down, idx)
    return keep
