"""mapgen.infer"""
