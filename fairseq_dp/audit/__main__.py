# Copyright (c) fairseq_dp contributors. MIT license.
from .run import main

main()
