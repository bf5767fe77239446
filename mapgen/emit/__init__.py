"""mapgen.emit"""
