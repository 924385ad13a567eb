"""ChatGLM-6B, implemented here: config, tokenizer, model, quantization and loading of the official checkpoints."""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .text import build_prompt, process_response
from .configuration import ChatGLMConfig
from .loading import DEMO_NOTICE, ModelLoadError, load_model
from .modeling import ChatGLMForConditionalGeneration, ChatGLMModel
from .tokenization import ChatGLMTokenizer

__all__ = ["ChatGLMConfig", "ChatGLMTokenizer", "ChatGLMForConditionalGeneration", "ChatGLMModel", "load_model",
           "build_prompt", "process_response", "DEMO_NOTICE", "ModelLoadError"]


def _register_with_auto_classes():
    try:
        AutoConfig.register("chatglm", ChatGLMConfig)
    except ValueError:  # already registered (re-import)
        pass
    for auto in (AutoModel, AutoModelForCausalLM):
        try:
            auto.register(ChatGLMConfig, ChatGLMForConditionalGeneration)
        except ValueError:
            pass
    try:
        AutoTokenizer.register(ChatGLMConfig, slow_tokenizer_class=ChatGLMTokenizer)
    except (ValueError, TypeError):
        pass


_register_with_auto_classes()
