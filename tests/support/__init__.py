"""What the tests share: fakes and builders for unit tests, the live
``vramctl up`` harness, the Docker engine's helpers and invariant recorder,
the Kubernetes API emulator and its test kubelet, the image tests' loaders.

Test modules import from here, never from another test module or from a
``conftest.py``; the ``conftest.py`` files hold only fixtures and hooks.
"""
