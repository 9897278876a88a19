"""Host side of edgeshift: builds a portfolio of pruned variants of a model (needs torch)."""

import sys

if sys.version_info < (3, 10):  # the agent runs on 3.8+ (JetPack 5); the exporter does not
    raise ImportError(f"edgeshift's exporter needs Python 3.10+ (this is {sys.version.split()[0]}); "
                      f"the agent (edgeshift-agent, edgeshift-fleet) runs on 3.8+")
