"""Default run: a tiny Llama-family model that runs offline on a laptop CPU in seconds.

Override any field from the command line, e.g.
  --config.model.hf_path=/path/to/hf_model --config.model.compute_dtype=bfloat16
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.hf_path = ""  # a local HF folder (config.json + safetensors); "" = random init
    config.model.model_type = "llama"
    config.model.vocab_size = 512
    config.model.hidden_size = 128
    config.model.intermediate_size = 352
    config.model.num_layers = 4
    config.model.num_heads = 4
    config.model.num_kv_heads = 2
    config.model.head_dim = 32
    config.model.rope_theta = 10000.0
    config.model.rms_norm_eps = 1e-5
    config.model.tie_word_embeddings = True
    config.model.max_position_embeddings = 2048
    config.model.param_dtype = "float32"
    config.model.compute_dtype = "float32"  # bfloat16 on accelerators
    config.model.scan_layers = True

    # Until the trainer lands, the default job runs a forward pass on random tokens.
    config.demo = ml_collections.ConfigDict()
    config.demo.batch_size = 4
    config.demo.seq_len = 128
    return config
