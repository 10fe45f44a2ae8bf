"""End-to-end jobs that join the stages: `adapt` (the main job behind `dgst train`).

Library modules never import from here; jobs and the CLI import the library.
"""
