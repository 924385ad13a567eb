"""The GLM-6B network (ChatGLM-6B), with the official weight names.

Shapes: B batch, S sequence, H hidden, nh heads, hd = H / nh, P prefix length (P-Tuning v2).
Activations are batch-first ([B, S, H]); the KV cache is kv_cache.KVCache ([B, nh, T, hd] per layer,
written in place; any transformers Cache works).
The numerics follow the original exactly where it matters (see ../shared/golden/NOTES.md): fp16-rounded rotary
frequencies, the fixed residual scale, the -10000 mask fill, and the model-built GLM masks and positions.
"""
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import cpu_kernels
from .beam_search import beam_search
from .chat import OPTION_NAMES, chat_with_generate, generation_options
from .configuration import ChatGLMConfig
from .engine import Engine, Sequence
from .kv_cache import KVCache, PackedPrompts, RaggedCache
from .positions import glm_anchors, glm_positions
from .quantize import quantize_model, replace_with_empty_quantized
from .text import History, build_prompt
from .validation import GenerationOptions

_D = GenerationOptions()  # chat()'s defaults are upstream's, kept in one place

# The original's GLMBlock takes its own num_layers argument (default 28) that the model never passes, so the
# residual scale is sqrt(2 * 28) for every checkpoint, whatever config.num_layers says.
RESIDUAL_SCALE = math.sqrt(2 * 28)
MASK_FILL = -10000.0  # not -inf: a fully masked query row (left padding) gets uniform attention, not NaN


# ---- 2-D rotary position encoding -------------------------------------------------------------------------------

def rotary_inv_freq(dim: int, base: float = 10000.0) -> torch.Tensor:
    # The original stores inv_freq in fp16; its rounding is part of the numerics (0.06 logit change without it).
    return (1.0 / base ** (torch.arange(0, dim, 2).float() / dim)).half().float()


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        # Kept only so state dicts keep the official key; the value is always recomputed, as in the original.
        self.register_buffer("inv_freq", rotary_inv_freq(dim).half())
        self._table = None  # (cos, sin) in fp32 for positions [0, n)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "inv_freq", None)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype, bound: Optional[int] = None):
        """cos/sin for integer positions [...], each [..., dim]. bound: a known upper bound on the positions (so
        sizing the table needs no device sync); None -> read positions.max()."""
        n = (int(positions.max()) + 1 if positions.numel() else 1) if bound is None else bound
        if self._table is None or self._table[0].shape[0] < n or self._table[0].device != positions.device:
            n = max(n, 2 * self._table[0].shape[0] if self._table is not None else 64)
            t = torch.arange(n, device=positions.device, dtype=torch.float32)
            freqs = torch.outer(t, rotary_inv_freq(self.dim).to(positions.device))
            emb = torch.cat([freqs, freqs], dim=-1)
            self._table = (emb.cos(), emb.sin())
        cos, sin = self._table
        return F.embedding(positions, cos).to(dtype), F.embedding(positions, sin).to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_tables(rotary: RotaryEmbedding, position_ids, dtype, bound=None):
    """(cos, sin) for every layer, computed once per forward.

    2-D positions [B, 2, S] (GLM): the first half of each head rotates by the absolute position, the second half by
    the block position; both tables come back concatenated on the last dim, [B, 1, S, hd], so one elementwise pass
    applies them (see rotate_halves). 1-D positions [B, S]: [B, 1, S, hd].
    """
    cos, sin = rotary.cos_sin(position_ids, dtype, bound)
    if position_ids.dim() == 3:  # [B, 2, S, hd/2] -> [B, 1, S, hd]
        cos, sin = torch.cat([cos[:, 0], cos[:, 1]], dim=-1), torch.cat([sin[:, 0], sin[:, 1]], dim=-1)
    return cos.unsqueeze(1), sin.unsqueeze(1)


def rotate_halves(x):
    """rotate_half applied to each half of the last dim separately: [a1 a2 | b1 b2] -> [-a2 a1 | -b2 b1]."""
    x = x.unflatten(-1, (2, 2, -1))  # [..., half, part, quarter]
    return torch.stack([-x[..., 1, :], x[..., 0, :]], dim=-2).flatten(-3)


# ---- blocks -----------------------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.position_encoding_2d = config.position_encoding_2d
        rot_dim = self.head_dim // 2 if self.position_encoding_2d else self.head_dim
        self.rotary_emb = RotaryEmbedding(rot_dim)
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, device=device, dtype=dtype)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, device=device, dtype=dtype)

    def forward(self, x, rope, mask, cache: Optional[Cache], prefix_kv=None):
        """rope: (cos, sin) from rope_tables, shared by all layers."""
        B, S, _ = x.shape
        # per-head [q_h | k_h | v_h] layout, as the checkpoint stores it
        qkv = self.query_key_value(x).view(B, S, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # [B, nh, S, hd] each
        cos, sin = rope
        rotate = rotate_halves if self.position_encoding_2d else rotate_half
        # q and k sit side by side in each head's slice: one elementwise pass rotates both
        qk = qkv[..., :2 * self.head_dim].unflatten(-1, (2, self.head_dim))  # [B, nh, S, 2, hd]
        qk = qk * cos.unsqueeze(-2) + rotate(qk) * sin.unsqueeze(-2)
        q, k = qk.unbind(-2)
        if isinstance(cache, RaggedCache):  # the engine's decode step: each row attends over its own cache
            ctx = cache.attend(self.layer_idx, q, k, v, lambda q, k, v: attention(q, k, v, mask, self.layer_idx + 1))
            return self.dense(ctx.transpose(1, 2).reshape(B, S, -1))
        if isinstance(cache, PackedPrompts):  # the engine's prefill of several prompts laid end to end
            ctx = cache.attend(self.layer_idx, q, k, v, lambda q, k, v, m: attention(q, k, v, m, self.layer_idx + 1),
                               prefix_kv)
            return self.dense(ctx.transpose(1, 2).reshape(B, S, -1))
        if cache is not None:
            if prefix_kv is not None:  # P-Tuning: the (unrotated) prefix goes in front, once, on the first step
                cache.update(prefix_kv[0], prefix_kv[1], self.layer_idx)
            k, v = cache.update(k, v, self.layer_idx)
        elif prefix_kv is not None:
            k, v = torch.cat([prefix_kv[0], k], dim=2), torch.cat([prefix_kv[1], v], dim=2)
        ctx = attention(q, k, v, mask, self.layer_idx + 1)
        return self.dense(ctx.transpose(1, 2).reshape(B, S, -1))


def attention(q, k, v, mask, c: float):
    """The original's scaled attention: q / (sqrt(hd) * c), masked with -10000, times c, softmax in fp32.

    The c = layer_index + 1 factors cancel in exact arithmetic (they exist to keep fp16 in range), so
    softmax(q k^T / sqrt(hd) + mask * c) with an additive mask of -10000 * c is the same function; SDPA computes it
    without materialising the scores in eager fp32 on the way.
    """
    bias = None
    if mask is not None:
        # The original *replaces* masked scores, so a query row with every key masked (left padding) attends
        # uniformly; an additive bias would not. A zero query gives that row equal scores, hence the same result.
        dead = mask.all(dim=-1, keepdim=True)
        q = q.masked_fill(dead, 0.0)
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(mask & ~dead, MASK_FILL * c)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if q.shape[-2] == 1 and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        # Decoding on CPU in 16 bits: PyTorch's fused kernel is slow for a single query (benchmarks/README.md),
        # so: scores, softmax in fp32 (as the original), weighted values. k is a view of
        # the KV cache's buffer; k @ q^T reads it in place, where q @ k^T would first copy it.
        if bias is None and q.dtype == torch.bfloat16 and cpu_kernels.DECODE_ATTENTION and not q.requires_grad:
            ctx = cpu_kernels.decode_attention(q, k, v, scale)  # float32 inside, one launch (cpu_kernels.py)
            if ctx is not None:
                return ctx
        scores = torch.matmul(k, q.transpose(-1, -2)).transpose(-1, -2).float().mul_(scale)
        if bias is not None:
            scores += bias
        return torch.matmul(scores.softmax(dim=-1).to(q.dtype), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


class MLP(nn.Module):
    def __init__(self, config: ChatGLMConfig, device=None, dtype=None):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size, device=device, dtype=dtype)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size, device=device, dtype=dtype)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        eps = config.layernorm_epsilon
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps, device=device, dtype=dtype)
        self.attention = SelfAttention(config, layer_idx, device=device, dtype=dtype)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps, device=device, dtype=dtype)
        self.mlp = MLP(config, device=device, dtype=dtype)

    def forward(self, x, rope, mask, cache=None, prefix_kv=None):
        # GLM's residuals add the layer-norm output (not the block input), scaled by RESIDUAL_SCALE
        a = self.input_layernorm(x)
        h = a * RESIDUAL_SCALE + self.attention(a, rope, mask, cache, prefix_kv)
        m = self.post_attention_layernorm(h)
        return m * RESIDUAL_SCALE + self.mlp(m)


class PrefixEncoder(nn.Module):
    """P-Tuning v2: learned per-layer past keys/values for P virtual tokens, [P, 2 * L * H]."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        out = 2 * config.num_layers * config.hidden_size
        self.prefix_projection = config.prefix_projection
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.Tanh(),
                                       nn.Linear(config.hidden_size, out))
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, out)

    def forward(self, prefix_tokens):
        e = self.embedding(prefix_tokens)
        return self.trans(e) if self.prefix_projection else e


# ---- the model --------------------------------------------------------------------------------------------------

class ChatGLMModel(nn.Module):
    """Embedding, GLM blocks, final layer norm; owns the GLM mask/position rules and the P-Tuning prefix."""

    gradient_checkpointing = False  # switched by transformers' gradient_checkpointing_enable()

    def __init__(self, config: ChatGLMConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(GLMBlock(config, i, device=device, dtype=dtype) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, device=device, dtype=dtype)
        self.pre_seq_len = config.pre_seq_len
        if self.pre_seq_len is not None:
            self.prefix_encoder = PrefixEncoder(config)
            self.prefix_dropout = nn.Dropout(0.1)

    # GLM prefix-LM inputs built from the ids (the model's own rule; the tokenizer's differs, see glm_positions)
    def context_lengths(self, input_ids) -> List[int]:
        return [glm_anchors(row, self.config)[0] for row in input_ids.tolist()]

    def mask_positions(self, input_ids) -> List[int]:
        return [glm_anchors(row, self.config)[1] for row in input_ids.tolist()]

    def build_mask(self, input_ids):
        """[B, 1, S, S] bool, True = blocked: causal, but the whole context (before <sop>) is visible to all."""
        B, S = input_ids.shape
        visible = torch.ones(B, S, S, device=input_ids.device).tril_()
        for i, ctx in enumerate(self.context_lengths(input_ids)):
            visible[i, :, :ctx] = 1
        return (visible < 0.5).unsqueeze(1)

    def build_position_ids(self, input_ids):
        """[B, 2, S]: absolute positions frozen at the mask position from <sop> on, and block positions 1, 2, ..."""
        S = input_ids.shape[1]
        return torch.stack([glm_positions(*glm_anchors(row, self.config), 0, S, device=input_ids.device)
                            for row in input_ids.tolist()])

    def prefix_kv(self, batch_size, dtype, device):
        tokens = torch.arange(self.pre_seq_len, device=device).unsqueeze(0).expand(batch_size, -1)
        L, nh = self.config.num_layers, self.config.num_attention_heads
        hd = self.config.hidden_size // nh
        kv = self.prefix_encoder(tokens).to(dtype).view(batch_size, self.pre_seq_len, 2 * L, nh, hd)
        kv = self.prefix_dropout(kv).permute(2, 0, 3, 1, 4)  # [2L, B, nh, P, hd]
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(L)]

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, cache: Optional[Cache] = None,
                inputs_embeds=None):
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = x.shape[:2]
        past_len = cache.get_seq_length() if cache is not None else 0
        first = past_len == 0
        if first:
            if isinstance(cache, PackedPrompts):  # each prompt brings its own mask
                attention_mask = None
            elif attention_mask is None or attention_mask.dtype != torch.bool:
                attention_mask = self.build_mask(input_ids)
            if position_ids is None:
                position_ids = self.build_position_ids(input_ids)
        elif position_ids is None:
            raise ValueError("position_ids are required when decoding with a cache (see prepare_inputs_for_generation)")
        elif attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = None
        prefix = None
        if self.pre_seq_len is not None and first:
            prefix = self.prefix_kv(B, x.dtype, x.device)
        if self.pre_seq_len is not None and attention_mask is not None:
            visible = attention_mask.new_zeros(*attention_mask.shape[:3], self.pre_seq_len)
            attention_mask = torch.cat([visible, attention_mask], dim=3)
        # GLM positions never exceed the sequence length, so while decoding the table size is known without reading
        # the positions back from the device; the first call of a sequence checks them.
        bound = None if first else past_len + S + 1
        rope = rope_tables(self.layers[0].attention.rotary_emb, position_ids, x.dtype, bound)
        for i, layer in enumerate(self.layers):
            p = prefix[i] if prefix is not None else None
            if self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(layer.__call__, x, rope, attention_mask, None, p)
            else:
                x = layer(x, rope, attention_mask, cache, p)
        return self.final_layernorm(x)


@dataclass
class ChatGLMOutput(CausalLMOutputWithPast):
    """position_ids: the [B, 2, S] GLM positions the model built itself for the first step of a cached sequence,
    so generation extends them per step instead of rebuilding them from the ids."""
    position_ids: Optional[torch.LongTensor] = None


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in. transformers' default, the first floating parameter, would read the
        fp16 scales of a quantized embedding (--quantize-embeddings) and so save a bf16 model as "float16"."""
        return getattr(self, self.base_model_prefix, self).final_layernorm.weight.dtype

    def _init_weights(self, module):
        # The official weights always come from a checkpoint; fresh models (demo checkpoint, tests) get small
        # normal weights so they are at least well-conditioned.
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.dtype.is_floating_point:
            module.weight.data.normal_(0.0, 0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}
    # the loss is a mean over each batch's label tokens (as the original); it ignores num_items_in_batch, so
    # transformers' Trainer must scale for gradient accumulation and world size itself
    accepts_loss_kwargs = False

    def __init__(self, config: ChatGLMConfig, device=None, dtype=None):
        super().__init__(config)
        self.transformer = ChatGLMModel(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
        if config.pre_seq_len is not None:
            for name, p in self.named_parameters():
                if not name.startswith("transformer.prefix_encoder."):
                    p.requires_grad_(False)
        if config.quantization_bit:  # pre-quantized checkpoints: empty quantized layers, filled by loading
            replace_with_empty_quantized(self, config.quantization_bit)
        self.is_demo = False
        self.name_or_path = getattr(config, "_name_or_path", "")
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, return_dict=True, logits_to_keep: int = 0, **kwargs):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache and not (self.training and labels is not None):
            cache = KVCache(self.config)
        built_positions = None
        if position_ids is None and cache is not None and input_ids is not None and cache.get_seq_length() == 0:
            position_ids = built_positions = self.transformer.build_position_ids(input_ids)
        h = self.transformer(input_ids, position_ids, attention_mask, cache, inputs_embeds)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            logits32 = logits.float()
            loss = F.cross_entropy(logits32[:, :-1].reshape(-1, logits32.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
            loss = loss.to(h.dtype)
        return ChatGLMOutput(loss=loss, logits=logits, cache=cache, position_ids=built_positions)

    # ---- transformers' generate() hooks (GLM positions and masks, NOTES.md §5) -----------------------------------
    # generate() insists on 2-D attention masks and builds 1-D positions of its own, so the GLM ones (the tokenizer's
    # [B, 1, S, S] mask and [B, 2, S] positions) travel through it as glm_attention_mask / glm_position_ids.
    @staticmethod
    def _glm_inputs(attention_mask, position_ids, kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            kwargs["glm_attention_mask"] = attention_mask
            attention_mask = None
        if position_ids is not None and position_ids.dim() == 3:
            kwargs["glm_position_ids"] = position_ids
            position_ids = None
        return attention_mask, position_ids

    def generate(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        attention_mask, position_ids = self._glm_inputs(attention_mask, position_ids, kwargs)
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        return None  # GLM positions are built by the model (or given as glm_position_ids)

    def prepare_inputs_for_generation(self, input_ids, cache=None, glm_attention_mask=None, glm_position_ids=None,
                                      use_cache=True, **kwargs):
        mask = glm_attention_mask if glm_attention_mask is not None and glm_attention_mask.dtype == torch.bool else None
        position_ids = glm_position_ids
        if cache is not None and cache.get_seq_length() > 0:
            if position_ids is not None:
                position_ids = position_ids[..., -1:]
            else:
                S = input_ids.shape[1]
                position_ids = torch.stack([glm_positions(*glm_anchors(row, self.config), S - 1, S,
                                                          device=input_ids.device) for row in input_ids.tolist()])
            return {"input_ids": input_ids[:, -1:], "position_ids": position_ids,
                    "attention_mask": mask[:, :, -1:] if mask is not None else None,
                    "cache": cache, "use_cache": use_cache, "logits_to_keep": 1}
        return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask, "cache": cache,
                "use_cache": use_cache, "logits_to_keep": 1 if use_cache else 0}

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        # our in-place cache instead of DynamicCache, sized for the whole generation (prefix included)
        if (model_kwargs.get("cache") is None and generation_config.use_cache is not False
                and generation_config.cache_implementation is None):
            model_kwargs["cache"] = KVCache(self.config, max_length=max_cache_length + (self.config.pre_seq_len or 0))
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                                     max_cache_length)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        """Extends the GLM mask and positions by one step. Decoding only ever reads the last mask row and the last
        position, so only those are kept: the next ones follow from them without looking at the ids."""
        model_kwargs["cache"] = outputs.cache
        mask = model_kwargs.get("glm_attention_mask")
        if mask is not None and mask.dtype == torch.bool:
            # the new token sees what the last token saw, plus itself
            row = mask[:, :, -1:]
            model_kwargs["glm_attention_mask"] = torch.cat([row, row.new_zeros(*row.shape[:3], 1)], dim=3)
        pos = model_kwargs.get("glm_position_ids")
        if pos is None:
            pos = getattr(outputs, "position_ids", None)  # built by the model on the first step
        if pos is not None:
            nxt = pos[..., -1:].clone()  # the absolute position stays; the block position counts on
            nxt[:, 1] += 1
            model_kwargs["glm_position_ids"] = nxt
        return model_kwargs

    # ---- conversation (ChatGLM-6B's chat API; runs on chatglm.engine as a batch of one) -------------------------
    def chat(self, tokenizer, query: str, history: Optional[History] = None, max_length: int = _D.max_length,
             num_beams=1, do_sample=_D.do_sample, top_p=_D.top_p, temperature=_D.temperature, logits_processor=None,
             stop=None, **kwargs):
        """(response, history + [(query, response)]). Extra kwargs: the GenerationOptions fields (repetition_penalty,
        top_k, max_new_tokens, seed, ...); others go to generate(). stop: strings that end the reply (the reply is
        cut before the first one). Beam search (num_beams > 1) runs on transformers' generate()."""
        options = generation_options(self.config, max_length, do_sample, top_p, temperature, stop, kwargs)
        others = set(kwargs) - OPTION_NAMES - {"stopping_criteria"}
        if (num_beams > 1 or others) and not options.stop:
            return chat_with_generate(self, tokenizer, query, history, options, num_beams, logits_processor, kwargs)
        *_, last = self.stream_chat(tokenizer, query, history, max_length=max_length, do_sample=do_sample,
                                    top_p=top_p, temperature=temperature, logits_processor=logits_processor,
                                    stop=stop, **kwargs)
        return last

    def stream_chat(self, tokenizer, query: str, history: Optional[History] = None, max_length: int = _D.max_length,
                    do_sample=_D.do_sample, top_p=_D.top_p, temperature=_D.temperature, logits_processor=None,
                    stop=None, stopping_criteria=None, **kwargs):
        """Yields (response_so_far, history + [(query, response_so_far)]) as tokens arrive.

        The original never yielded the last token (a length-stopped reply lost it; an <eop>-only reply yielded
        nothing). We yield what it yielded and then, where it differs, the complete reply, so the last yield always
        equals chat()'s result. Closing the generator stops generation. logits_processor / stopping_criteria:
        transformers-style callables, still accepted (applied per token to this sequence).
        """
        options = generation_options(self.config, max_length, do_sample, top_p, temperature, stop, kwargs)
        history = list(history or [])
        criteria = stopping_criteria
        seq = Sequence(tokenizer.encode(build_prompt(query, history)), options, tokenizer, self.config,
                       list(logits_processor or []),
                       (lambda ids, scores: bool(criteria(ids, scores).all())) if criteria else None)
        engine = Engine(self, kv_budget=0)  # a batch of one always runs, whatever its size
        engine.add(seq)
        last = None
        try:
            while not seq.finished:
                engine.step()
                if seq.stopped_by_string:
                    break
                if not seq.finished:
                    last = seq.visible
                    yield last, history + [(query, last)]
        finally:
            seq.cancelled = True  # closing the generator ends generation at once
            seq.cache = None
        if last is None or seq.response != last:
            yield seq.response, history + [(query, seq.response)]

    _beam_search = beam_search  # the original's beam ranking, in place of GenerationMixin's

    # ---- conveniences -----------------------------------------------------------------------------------------
    # Set by chatglm/cpu_pack.py's pack_for_cpu on the models it packs (that module sits above this one): gives the
    # plain layers back, so training and quantize() see ordinary Parameters.
    unpack_cpu_layers = None

    def train(self, mode: bool = True):
        # oneDNN-packed bf16 weights (inference on CPU) are not Parameters: training gets the plain layers back, so
        # every weight is a Parameter an optimizer created from now on will see
        if mode and self.unpack_cpu_layers is not None:
            self.unpack_cpu_layers(self)
        return super().train(mode)

    def quantize(self, bits: int, quantize_embeddings: bool = False):
        """Weight-only INT8/INT4 of the block linears, in place (the official chatglm-6b-int4/-int8 format).
        quantize_embeddings=True also quantizes the embedding that lm_head shares (chatglm-6b-int4-qe's format):
        ~0.8 GB less for the 6B model in INT4, outputs slightly different from the official INT4 model."""
        if self.unpack_cpu_layers is not None:
            self.unpack_cpu_layers(self)
        return quantize_model(self, bits, embeddings=quantize_embeddings)

    # Set by chatglm/loading.py (a module above this one; `import chatglm` imports it): reads the official layout.
    load_weights = None

    @classmethod
    def from_pretrained(cls, path, *args, dtype=None, device=None, torch_dtype=None, config=None, **kwargs):
        """Load a local folder (or cached hub id) in the official layout; see chatglm.loading.load_weights."""
        return cls.load_weights(path, dtype=dtype or torch_dtype, device=device, config=config)
