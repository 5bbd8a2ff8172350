"""fairseq-dp: differentially private fine-tuning as a fairseq plugin.

fairseq itself is not in ``install_requires``: every fairseq distribution for
Python 3.11 declares ``torchaudio``, whose resolution replaces a CPU torch with
a CUDA one. Install ``ve-fairseq==0.12.3`` with ``--no-deps`` (the Makefile
does); its real runtime dependencies are listed here.
"""

from setuptools import find_packages, setup

setup(
    name="fairseq-dp",
    version="0.1.0",
    description=(
        "Differentially private fine-tuning of RoBERTa encoders for fairseq, as a --user-dir "
        "plugin: RGP (reparametrized gradient perturbation), DP full fine-tuning with ghost "
        "clipping, and DP-LoRA"
    ),
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["fairseq_dp", "fairseq_dp.*"]),
    package_data={"fairseq_dp": ["config/*.yaml"]},
    install_requires=[
        "torch>=2.6",
        "opacus>=1.5,<2",
        # fairseq 0.12.3's runtime dependencies, minus torchaudio (speech only)
        "hydra-core>=1.3.2",
        "omegaconf>=2.3",
        "numpy>=1.21.3",
        "scipy",
        "regex",
        # fairseq's, and fairseq-dp-eval-e2e's BLEU (floor smoothing, variable reference counts: 2.x)
        "sacrebleu>=2.0",
        "tqdm",
        "bitarray",
        "cffi",
        "cython",
        "scikit-learn",
        "packaging",
        # checkpoint conversion and GLUE preparation (neither needs torch from pip)
        "safetensors>=0.4",
        "tokenizers>=0.15",
        # fairseq-dp-report's plots (matplotlib needs neither torch nor a display)
        "matplotlib>=3.5",
    ],
    extras_require={
        # transformers: the independent reference for the conversion tests
        # tensorboardX: fairseq's --tensorboard-logdir writer, for the validation-curve test
        "test": ["pytest>=7", "hypothesis>=6", "prv-accountant==0.2.0", "transformers>=4.40", "tensorboardX"],
        # matplotlib is now installed by default; the extra stays for old instructions
        "bench": [],
    },
    entry_points={
        "console_scripts": [
            "fairseq-dp-convert = fairseq_dp.convert:main",
            "fairseq-dp-prepare-glue = fairseq_dp.prepare_glue:main",
            "fairseq-dp-prepare-lm = fairseq_dp.prepare_lm:main",
            "fairseq-dp-pretrain = fairseq_dp.pretrain:main",
            "fairseq-dp-export = fairseq_dp.export:main",
            "fairseq-dp-plan = fairseq_dp.plan:main",
            "fairseq-dp-report = fairseq_dp.report:main",
            "fairseq-dp-flags = fairseq_dp.flags:main",
            "fairseq-dp-generate = fairseq_dp.generate:main",
            # needs pycocoevalcap==1.2, installed by the Makefile with --no-deps
            # (it declares pycocotools, which the scorers never import)
            "fairseq-dp-eval-e2e = fairseq_dp.eval_e2e:main",
            "fairseq-dp-audit = fairseq_dp.audit.run:main",
            "fairseq-dp-select = fairseq_dp.select:main",
        ],
    },
)
