"""llama3-deploy runtime: an exported Llama 3 decoder on ONNX Runtime, no torch.

    from llama3_deploy.runtime import Generator, SamplingParams
    gen = Generator("llama3-onnx/", device="cpu")
    result = gen.generate("Hello", SamplingParams(max_new_tokens=32))
    for delta in gen.stream([{"role": "user", "content": "Hi!"}], max_new_tokens=64, temperature=0.6):
        print(delta, end="")
"""
from .chat import ChatFormat
from .generate import GenerationResult, Generator
from .sampling import SamplingParams
from .tokenizer import StreamDecoder, Tokenizer

__all__ = ["ChatFormat", "GenerationResult", "Generator", "SamplingParams", "StreamDecoder", "Tokenizer"]
