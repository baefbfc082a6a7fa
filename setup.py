from setuptools import find_packages, setup

setup(
    name="twistedlrp",
    version="0.1.0",
    description="A Twisted application server for Django: threads for views, "
    "worker processes for long jobs, real start-up and shut-down.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # twisted/plugins is a namespace folder with no __init__.py on purpose:
    # Twisted scans it for dropins, so it is listed explicitly.
    packages=find_packages(include=["twistedlrp", "twistedlrp.*"]) + ["twisted.plugins"],
    # An explicit root makes an editable install put the project folder on
    # sys.path (a plain .pth), which is where Twisted looks for
    # twisted/plugins/ dropins; the default import-hook finder hides it.
    package_dir={"": "."},
    package_data={"twisted.plugins": ["twistedlrp_plugin.py"]},
    include_package_data=True,
    install_requires=[
        "Twisted>=24.11",
        "treq>=24.9",
        "Django>=5.2",
        "django-tasks>=0.8; python_version<'3.12'",
    ],
    extras_require={
        "reload": ["watchfiles>=0.21"],
        "postgres": ["psycopg[binary]>=3.1"],
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "pytest-timeout>=2.3",
            "treq>=24.9",
            "psutil>=5.9",
            "ruff>=0.6",
            # The packaging test builds a wheel without build isolation.
            "setuptools>=68",
            "wheel",
            "watchfiles>=0.21",
        ],
    },
    classifiers=[
        "Framework :: Django",
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)
