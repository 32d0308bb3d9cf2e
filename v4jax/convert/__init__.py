"""Checkpoint conversion between v4jax (Orbax) and HF-style safetensors (SPEC §11).

hf_names: the name/layout mapping and config.json keys (the one place that knows them);
safetensors_io: streaming reader/writer; ckpt_reader: tensor-by-tensor Orbax reads;
export / importer: the two directions behind tools/convert_to_safetensors.py and
tools/import_safetensors.py.
"""
