"""Ray pipelines: corpus build, meta-training, policy search, sparsity-head labels.

Every module here may import Ray. Ray binds the machine's external address unless this
variable is set before `import ray`; setting it when the package loads covers every module,
whichever imports Ray first, so each local cluster listens on 127.0.0.1 only.
"""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
