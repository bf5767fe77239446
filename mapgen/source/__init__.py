"""mapgen.source"""
