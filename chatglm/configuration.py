"""ChatGLMConfig: the fields of the official config.json, with the original's defaults."""
from transformers import PretrainedConfig


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
