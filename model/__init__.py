"""The DeepSeek-V3 architecture in Flax NNX (not built yet).

Will hold: MLA, DeepSeekMoE with group-limited sigmoid routing, MTP and YaRN RoPE, the config
read from a Hugging Face `config.json`, and the safetensors loader for bf16 and FP8 weights.
"""
