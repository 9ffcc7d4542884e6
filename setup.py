"""refseg_jax: referring expression segmentation in JAX/Flax.

Every range below is one the project has run (versions in README.md).
"""

import setuptools

setuptools.setup(
    name='refseg_jax',
    version='0.1.0',
    description='Referring expression segmentation under full, click and '
                'text supervision, in JAX/Flax.',
    packages=setuptools.find_packages(include=['refseg_jax', 'refseg_jax.*']),
    package_data={'refseg_jax.data.ref_shapes': ['vocab.txt']},
    python_requires='>=3.11',
    install_requires=[
        'absl-py>=2.5,<3',
        'clu==0.0.12',
        'etils[epath]>=1.15,<2',
        'flax>=0.12.8,<0.13',
        # TFDS needs it at run time without declaring it.
        'importlib_resources>=7.1,<8',
        'jax>=0.10.2,<0.11',
        # The benchmarks' plots.
        'matplotlib>=3.11,<3.12',
        'ml-collections>=1.1,<1.2',
        'numpy>=2.4,<2.5',
        'optax>=0.2.8,<0.3',
        'orbax-checkpoint>=0.12.8,<0.13',
        'pillow>=13,<14',
        'pycocotools>=2.0.11,<2.1',
        # Pretrained checkpoints (refseg_jax.models.convert).
        'safetensors>=0.8,<0.9',
        # Data only: the CPU build where one exists.
        'tensorflow-cpu>=2.21,<2.22; platform_system == "Linux"',
        'tensorflow>=2.21,<2.22; platform_system != "Linux"',
        'tensorflow-datasets>=4.9.10,<4.10',
        # clu's TensorBoard writer needs it; tensorflow-cpu does not bring it.
        'tensorboard>=2.21,<2.22',
        # 5.x: BertTokenizerFast(vocab=...) (4.x called it vocab_file).
        'transformers>=5.23,<6',
    ],
    extras_require={
        # Accelerators: JAX's own extras, pinned by jax to the jaxlib (and
        # libtpu) of the jax installed (docs/launch.md).
        'tpu': ['jax[tpu]>=0.10.2,<0.11'],
        'cuda': ['jax[cuda12]>=0.10.2,<0.11'],
        'test': [
            'pytest>=9.2,<10',
            'pytest-xdist>=3.8,<4',
            # The checkpoint parity tests' reference models, run on CPU: take
            # the CPU wheel (--extra-index-url
            # https://download.pytorch.org/whl/cpu), not GBs of CUDA packages.
            'torch==2.13.0',
            # Runs notebooks/quickstart.ipynb (tests/test_notebook.py).
            'ipykernel>=7.4,<8',
            'nbclient>=0.11,<0.12',
            'nbformat>=5.11,<6',
            # One tiny trained workdir shared by the xdist workers.
            'filelock>=4.3,<5',
        ],
    },
)
