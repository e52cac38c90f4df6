from setuptools import Extension, find_packages, setup

setup(
    name="mshvstack",
    version="0.1.0",
    description="Python userspace virtualization stack for Linux /dev/mshv (Microsoft Hypervisor root partition), with a simulator",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["mshvstack", "mshvstack.*"]),
    package_data={"mshvstack.vmm.guests": ["*.elf"], "mshvstack.net": ["*.h"], "mshvstack.partition": ["*.pyi"]},
    setup_requires=["cffi>=1.16"],
    # The exit decoders' C half (a plain CPython extension: it builds Python objects).
    ext_modules=[Extension("mshvstack.partition._exitcore", ["mshvstack/partition/_exitcore.c"])],
    cffi_modules=[
        "mshvstack/abi/_build.py:ffibuilder",
        "mshvstack/backend/sim/engines/_build_fastpath.py:ffibuilder",
        "mshvstack/vmbus/_build_ringcore.py:ffibuilder",
        "mshvstack/partition/_build_dma.py:ffibuilder",
    ],
    install_requires=[
        "cffi>=1.16",
        "typer>=0.12",
        "rich>=13",
        "pyelftools>=0.31",
        "unicorn==2.1.4",
        "capstone>=5.0",
    ],
    extras_require={"test": ["pytest>=8", "hypothesis>=6.100", "mypy>=1.10", "lz4>=4", "zstandard>=0.22", "qemu.qmp>=0.0.3",
                             "build>=1", "ruff==0.17.6"]},
    entry_points={"console_scripts": ["mshvstack=mshvstack.cli:main"]},
    zip_safe=False,
)
