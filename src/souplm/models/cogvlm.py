"""A CogVLM-style vision-language model: a Llama-family decoder with a visual expert in every layer.

CogVLM (Wang et al., 2023, "CogVLM: Visual Expert for Pretrained Language Models") keeps a pretrained
language model frozen and gives every attention and MLP weight a trainable twin, the *visual expert*,
that processes the image tokens; text tokens go through the original (*language expert*) weights, and
the two kinds of tokens meet in attention. q, k and v are one fused `query_key_value` matrix. transformers
has no such class for Llama-family decoders, so souplm ships this small one. It is the layout
`arch/mappings/llama-to-cogvlm.yaml` maps a Llama (or the LM inside a LLaVA) onto, and the target of the
AdaMMS case on real weights (`souplm.experiment.cogvlm_stage`).

Tensor names (those the mapping spec and the merge engine see):

    model.embed_tokens.weight                                       (the output layer too, when tied)
    lm_head.weight                                                  (only when untied)
    model.layers.N.input_layernorm.weight, .post_attention_layernorm.weight
    model.layers.N.self_attn.{language,vision}_expert_query_key_value.weight   [q; k; v] rows, fused
    model.layers.N.self_attn.vision_expert_query_key_value.bias                (the visual expert only)
    model.layers.N.self_attn.{language,vision}_expert_dense.weight
    model.layers.N.mlp.{language,vision}_mlp.{gate,up,down}_proj.weight
    model.norm.weight
    model.vision.encoder.*   a CLIP vision tower;  model.vision.adapter.linear_{1,2}.*   its projector

Images enter as in LLaVA: the prompt holds `image_seq_length` copies of the image token per image (a
`LlavaProcessor` expands `<image>`), and their embeddings are replaced by the projected patch features.
Positions are the usual 0..n-1 over the non-padding tokens. A model folder holds `config.json`
(`model_type: souplm_cogvlm`), `model.safetensors` and the processor's files; `load_pretrained` reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SoupError

MODEL_TYPE = "souplm_cogvlm"
WEIGHTS = "model.safetensors"


@dataclass
class CogVLMConfig:
    """The decoder's config (a transformers LlamaConfig), the vision tower's (CLIPVisionConfig) and the
    image-token wiring."""

    text_config: Any
    vision_config: Any
    image_token_index: int
    image_seq_length: int
    vision_feature_layer: int = -2

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, "architectures": ["CogVLMForCausalLM"],
                "text_config": self.text_config.to_dict(), "vision_config": self.vision_config.to_dict(),
                "image_token_index": self.image_token_index, "image_seq_length": self.image_seq_length,
                "vision_feature_layer": self.vision_feature_layer}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CogVLMConfig:
        from transformers import CLIPVisionConfig, LlamaConfig

        if d.get("model_type") != MODEL_TYPE:
            raise SoupError(f"not a {MODEL_TYPE} config (model_type {d.get('model_type')!r})")
        try:
            return cls(LlamaConfig(**d["text_config"]), CLIPVisionConfig(**d["vision_config"]),
                       int(d["image_token_index"]), int(d["image_seq_length"]), int(d.get("vision_feature_layer", -2)))
        except KeyError as e:
            raise SoupError(f"{MODEL_TYPE} config lacks {e.args[0]!r}") from None

    @property
    def rope_theta(self) -> float:
        t = self.text_config
        params = getattr(t, "rope_parameters", None) or {}
        return float(params.get("rope_theta", getattr(t, "rope_theta", 10000.0)))


# ------------------------------------------------------------------------------------------ building blocks


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(x: torch.Tensor, visual: torch.Tensor | None, language: nn.Module, vision: nn.Module) -> torch.Tensor:
    """`language(x)` on text tokens and `vision(x)` on image tokens (`visual` marks them)."""
    if visual is None or not bool(visual.any()):
        return language(x)
    text_out = language(x[~visual])
    out = x.new_empty(*x.shape[:-1], text_out.shape[-1])
    out[~visual] = text_out
    out[visual] = vision(x[visual])
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: Any):
        super().__init__()
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        fused = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.language_expert_query_key_value = nn.Linear(cfg.hidden_size, fused, bias=False)
        self.vision_expert_query_key_value = nn.Linear(cfg.hidden_size, fused, bias=True)
        self.language_expert_dense = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)
        self.vision_expert_dense = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, visual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor, cache: dict | None) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = route(x, visual, self.language_expert_query_key_value, self.vision_expert_query_key_value)
        d = self.head_dim
        q, k, v = qkv.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q = q.view(b, t, self.heads, d).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, d).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            if "k" in cache:
                k = torch.cat((cache["k"], k), dim=2)
                v = torch.cat((cache["v"], v), dim=2)
            cache["k"], cache["v"] = k, v
        groups = self.heads // self.kv_heads
        if groups > 1:  # grouped-query attention: each k/v head serves `groups` query heads
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, t, self.heads * d)
        return route(out, visual, self.language_expert_dense, self.vision_expert_dense)


class ExpertMLP(nn.Module):
    def __init__(self, cfg: Any):
        super().__init__()
        self.language_mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.vision_mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        return route(x, visual, self.language_mlp, self.vision_mlp)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Any):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = ExpertMLP(cfg)

    def forward(self, x, visual, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), visual, cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x), visual)


class Projector(nn.Module):
    """LLaVA's two-layer GELU projector from vision features to the decoder's width."""

    def __init__(self, vision_width: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class Vision(nn.Module):
    def __init__(self, config: CogVLMConfig):
        super().__init__()
        from transformers import CLIPVisionModel

        self.encoder = CLIPVisionModel(config.vision_config)
        self.adapter = Projector(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.feature_layer = config.vision_feature_layer

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(pixel_values, output_hidden_states=True).hidden_states[self.feature_layer]
        return self.adapter(hidden[:, 1:])  # CLIP's CLS token dropped, as LLaVA's "default" strategy does


class CogVLMModel(nn.Module):
    def __init__(self, config: CogVLMConfig):
        super().__init__()
        t = config.text_config
        self.config = config
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(t) for _ in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.vision = Vision(config)
        self.head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, caches: list[dict] | None = None,
                **_: Any) -> SimpleNamespace:
        """Hidden states of `input_ids` (B, T). `attention_mask` (B, S) covers the cached tokens too
        (S = cached + T); padding is on the left. `caches` (one dict per layer) keep keys and values."""
        t = input_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        s = attention_mask.shape[1]
        past = s - t
        visual = input_ids == self.config.image_token_index
        x = self.embed_tokens(input_ids)
        if bool(visual.any()):
            if pixel_values is None:
                raise SoupError("the prompt holds image tokens but no pixel_values were given")
            feats = self.vision(pixel_values.to(x.dtype))
            if feats.shape[0] * feats.shape[1] != int(visual.sum()):
                raise SoupError(f"{int(visual.sum())} image tokens in the prompt for {feats.shape[0]} images of "
                                f"{feats.shape[1]} tokens each")
            x = x.clone()
            x[visual] = feats.reshape(-1, feats.shape[-1]).to(x.dtype)
        else:
            visual = None
        # Positions count real tokens only, so left padding does not shift them.
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        inv_freq = 1.0 / (self.config.rope_theta ** (
            torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=x.device) / self.head_dim))
        freqs = pos[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        keys = torch.arange(s, device=x.device)
        queries = past + torch.arange(t, device=x.device)
        allowed = (keys[None, :] <= queries[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
        # A padding query sees nothing else: let it see itself, so no softmax row is empty (NaN).
        allowed = allowed | (keys[None, :] == queries[:, None])[None, None]
        for i, layer in enumerate(self.layers):
            x = layer(x, visual, cos, sin, allowed, None if caches is None else caches[i])
        return SimpleNamespace(last_hidden_state=self.norm(x))


class _TiedHead:
    """The output layer: the input embedding, transposed (not a module, so its weight is stored once)."""

    def __init__(self, embed: nn.Embedding):
        self.embed = embed

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.embed.weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.embed.weight


class CogVLMForCausalLM(nn.Module):
    """The decoder plus its output layer (tied or not); `generate` decodes greedily with a key/value cache."""

    def __init__(self, config: CogVLMConfig):
        super().__init__()
        self.config = config
        self.model = CogVLMModel(config)
        t = config.text_config
        if getattr(t, "tie_word_embeddings", True):
            self.__dict__["lm_head"] = _TiedHead(self.model.embed_tokens)
        else:
            self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, **_: Any) -> SimpleNamespace:
        hidden = self.model(input_ids, attention_mask, pixel_values).last_hidden_state
        return SimpleNamespace(logits=self.lm_head(hidden))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, max_new_tokens: int = 20,
                 pad_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
                 **_: Any) -> torch.Tensor:
        """Greedy decoding of left-padded prompts: the prompts followed by the new tokens, rows that
        ended padded with `pad_token_id` (transformers' generate, restricted to greedy search)."""
        eos = eos_token_id if eos_token_id is not None else self.config.text_config.eos_token_id
        eos_ids = torch.tensor(eos if isinstance(eos, list) else [] if eos is None else [eos], device=input_ids.device)
        pad = pad_token_id if pad_token_id is not None else (int(eos_ids[0]) if len(eos_ids) else 0)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        caches: list[dict] = [{} for _ in self.model.layers]
        hidden = self.model(input_ids, mask, pixel_values, caches).last_hidden_state[:, -1]
        out, done = [input_ids], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(int(max_new_tokens)):
            nxt = self.lm_head(hidden).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out.append(nxt[:, None])
            done = done | torch.isin(nxt, eos_ids)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            hidden = self.model(nxt[:, None], mask, None, caches).last_hidden_state[:, -1]
        return torch.cat(out, dim=1)

    # -- folders -------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS),
                  metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> CogVLMForCausalLM:
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            config = CogVLMConfig.from_dict(json.loads((folder / "config.json").read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise SoupError(f"{folder}: cannot read config.json ({e})") from None
        if not (folder / WEIGHTS).is_file():
            raise SoupError(f"{folder}: no {WEIGHTS}")
        model = cls(config)
        state = load_file(str(folder / WEIGHTS))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SoupError(f"{folder / WEIGHTS}: tensors do not fit the config (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
        return model.to(dtype).eval()


@torch.no_grad()
def from_llava(llava: nn.Module, lm: nn.Module | None = None) -> CogVLMForCausalLM:
    """A CogVLM-style model from a LlavaForConditionalGeneration: its vision tower and projector, and as
    both experts of every layer the decoder of `lm` (a LlamaForCausalLM-like model; default: the LLaVA's
    own language model). With `lm`, the embedding rows LLaVA added (`<image>`) get `lm`'s mean row.

    Both experts start equal and the qkv bias at zero, so the new model computes exactly what a LLaVA
    with that decoder computes; training the visual expert then makes them differ.
    """
    import copy

    cfg = llava.config
    vocab = llava.get_input_embeddings().weight.shape[0]
    text = copy.deepcopy(cfg.text_config)
    text.vocab_size = vocab
    text.tie_word_embeddings = bool((lm.config if lm is not None else cfg.text_config).tie_word_embeddings)
    config = CogVLMConfig(text, copy.deepcopy(cfg.vision_config), int(cfg.image_token_index),
                          int(cfg.image_seq_length), int(cfg.vision_feature_layer))
    model = CogVLMForCausalLM(config)
    decoder = lm.model if lm is not None else llava.model.language_model
    emb = decoder.embed_tokens.weight
    model.model.embed_tokens.weight[: emb.shape[0]] = emb
    model.model.embed_tokens.weight[emb.shape[0]:] = emb.mean(dim=0, keepdim=True)
    if not text.tie_word_embeddings:
        head = (lm if lm is not None else llava).lm_head.weight
        model.lm_head.weight[: head.shape[0]] = head
        model.lm_head.weight[head.shape[0]:] = head.mean(dim=0, keepdim=True)
    model.model.norm.weight.copy_(decoder.norm.weight)
    for ours, theirs in zip(model.model.layers, decoder.layers, strict=True):
        a = theirs.self_attn
        qkv = torch.cat((a.q_proj.weight, a.k_proj.weight, a.v_proj.weight), dim=0)
        for expert in ("language", "vision"):
            getattr(ours.self_attn, f"{expert}_expert_query_key_value").weight.copy_(qkv)
            getattr(ours.self_attn, f"{expert}_expert_dense").weight.copy_(a.o_proj.weight)
            mlp = getattr(ours.mlp, f"{expert}_mlp")
            for proj in ("gate_proj", "up_proj", "down_proj"):
                getattr(mlp, proj).weight.copy_(getattr(theirs.mlp, proj).weight)
        ours.self_attn.vision_expert_query_key_value.bias.zero_()
        ours.input_layernorm.weight.copy_(theirs.input_layernorm.weight)
        ours.post_attention_layernorm.weight.copy_(theirs.post_attention_layernorm.weight)
    model.model.vision.encoder.load_state_dict(llava.model.vision_tower.state_dict())
    model.model.vision.adapter.load_state_dict(llava.model.multi_modal_projector.state_dict())
    return model.eval()


def is_cogvlm(config: dict[str, Any]) -> bool:
    return config.get("model_type") == MODEL_TYPE


def load_pretrained(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[CogVLMForCausalLM, Any]:
    """The model and its LlavaProcessor (tokenizer with `<image>`, CLIP image processor)."""
    from transformers import LlavaProcessor
    from transformers.utils import logging as hf_logging

    model = CogVLMForCausalLM.from_pretrained(folder, dtype)
    # The processor reads config.json too and warns that souplm_cogvlm is not a transformers model type.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        processor = LlavaProcessor.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise SoupError(f"{folder}: cannot load the processor ({str(e).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(level)
    return model, processor
