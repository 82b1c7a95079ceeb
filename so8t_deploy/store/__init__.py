"""The base layer of build state: the workspace (cache directories, keys, atomic publish), the digest
cache and the identity of inputs. It imports none of the other packages, so every one of them can use it.
"""
