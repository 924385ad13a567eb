"""ChatGLMConfig: the fields of the official config.json, with the original's defaults, and the checks a config
must pass before a model is built from it."""
from typing import List

from transformers import PretrainedConfig

# fields that must be positive integers (the model's shapes are built from them)
POSITIVE_INT_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "max_sequence_length",
                       "inner_hidden_size")
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id")


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers"}

    def __init__(
        self,
        vocab_size=150528,
        hidden_size=4096,
        num_layers=28,
        num_attention_heads=32,
        layernorm_epsilon=1e-5,
        use_cache=False,
        bos_token_id=150004,
        eos_token_id=150005,
        mask_token_id=150000,
        gmask_token_id=150001,
        pad_token_id=0,
        max_sequence_length=2048,
        inner_hidden_size=16384,
        position_encoding_2d=True,
        quantization_bit=0,
        quantization_embeddings=False,
        pre_seq_len=None,
        prefix_projection=False,
        **kwargs,
    ):
        kwargs.pop("auto_map", None)  # remote-code pointers in official folders; we never follow them
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.layernorm_epsilon = layernorm_epsilon
        self.use_cache = use_cache
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        self.max_sequence_length = max_sequence_length
        self.inner_hidden_size = inner_hidden_size
        self.position_encoding_2d = position_encoding_2d
        self.quantization_bit = quantization_bit
        self.quantization_embeddings = quantization_embeddings
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.tie_word_embeddings = kwargs.pop("tie_word_embeddings", True)  # lm_head shares the embedding
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def config_problems(config: ChatGLMConfig) -> List[str]:
    """What makes `config` unusable, one phrase per field (empty when it is fine): wrong types, non-positive
    sizes, heads that do not divide hidden_size, token ids outside the vocabulary, a bad pre_seq_len."""
    problems = []
    for name in POSITIVE_INT_FIELDS:
        value = getattr(config, name, None)
        if not _is_int(value) or value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r:.40}")
    if problems:
        return problems  # the checks below combine these fields
    heads, hidden = config.num_attention_heads, config.hidden_size
    multiple = 4 if config.position_encoding_2d else 2  # each head's rotary halves (2-D: quarters) need even sizes
    if hidden % heads or (hidden // heads) % multiple:
        problems.append(f"num_attention_heads {heads} must divide hidden_size {hidden} into heads whose size is a "
                        f"multiple of {multiple} (e.g. 32 heads of 128 for 4096)")
    epsilon = config.layernorm_epsilon
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 < epsilon < 1:
        problems.append(f"layernorm_epsilon must be a small positive number, got {epsilon!r:.40}")
    for name in TOKEN_ID_FIELDS:
        value = getattr(config, name, None)
        if value is not None and (not _is_int(value) or not 0 <= value < config.vocab_size):
            problems.append(f"{name} must be a token id in 0..{config.vocab_size - 1}, got {value!r:.40}")
    if config.pre_seq_len is not None and (not _is_int(config.pre_seq_len) or config.pre_seq_len < 1):
        problems.append(f"pre_seq_len must be a positive integer (the P-Tuning prefix length), got "
                        f"{config.pre_seq_len!r:.40}")
    if config.quantization_bit not in (0, 4, 8):
        problems.append(f"quantization_bit must be 0, 4 or 8, got {config.quantization_bit!r:.40}")
    return problems
