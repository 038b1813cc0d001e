"""The twistd plugin: `twistd sbg -c FILE` runs the Simple Border Gateway."""

from twisted.application.service import ServiceMaker

sbg = ServiceMaker(
    "sbg",
    "sbg.tap",
    "Simple Border Gateway for a private Matrix federation",
    "sbg",
)
