"""The organism lab: building, training and evaluating the model organisms.

It sits above the engine (evaluation runs it) and reads the synthetic world of
`avprobe.organism` as data; nothing below imports the lab.
"""
