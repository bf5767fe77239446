"""mapgen.runtime"""
